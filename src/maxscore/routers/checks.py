"""Bad input found on the device in a routing step, raised at a check point instead of at the call.

A check that branches on tensor values waits for the device: on CUDA it stalls the queue once per
layer, and a CUDA graph cannot capture it.  So a router on an accelerator with
``validate="deferred"`` (the default) records what it finds in a small device buffer (its
``routing_issue``, int64 [6]: code, group, token, group size, capacity, valid tokens; the first
issue is kept) and ``check_routing(model)`` reads every router's record in one transfer and
raises the first issue with the message the eager check gives, naming the router's module and
the routing group.  ``step_routers`` (the optimizer step hook) calls it once per step.

Recorded: router logits with NaN/inf (the router's own check), and what the device engine flags
(``Assignment.issues``): scores with NaN/+inf, tokens with fewer than k allowed experts, an
infeasible capacity, non-finite warm prices.  On the CPU nothing is deferred: the checks cost no
device wait there, so they raise at the call.  ``validate="eager"`` raises at every call on every
device (a debugging mode: one host round trip per layer on CUDA).
"""

from __future__ import annotations

import torch
from torch import nn

from maxscore.solvers._validate import PRICES_MESSAGE, infeasible_message, nonfinite_message, short_message

# the record's codes, in the eager checks' order (the first found is the one raised)
LOGITS, SCORES, SHORT, INFEASIBLE, PRICES = 1, 2, 3, 4, 5
RECORD_SIZE = 6  # code, group, token, group size, capacity, valid tokens


def logits_message(where: str = "") -> str:
    return f"router logits contain NaN or inf{where}: the layer input x (or the gate weights) is not finite"


def new_record(device: torch.device | None = None) -> torch.Tensor:
    """An empty record (no issue)."""
    return torch.zeros(RECORD_SIZE, dtype=torch.int64, device=device)


def record_logits(record: torch.Tensor, logits_TE: torch.Tensor, group_size: int) -> None:
    """Records the first token whose logits are not finite, if any (no host wait)."""
    bad_T = ~torch.isfinite(logits_TE).all(1)
    token = bad_T.int().argmax().long()
    code = torch.where(bad_T.any(), LOGITS, 0)
    zero = torch.zeros_like(token)
    size = torch.full_like(token, group_size)
    _keep_first(record, torch.stack([code, token // group_size, token % group_size, size, zero, zero]))


def record_solver(
    record: torch.Tensor,
    issues_G4: torch.Tensor,
    capacity_G: torch.Tensor,
    valid_T: torch.Tensor | None,
    size: int,
) -> None:
    """Records the first issue of the first group the device engine flagged (``Assignment.issues``)
    in groups of ``size`` tokens (``valid_T``: bool [G x size] or None)."""
    issues = issues_G4.long()
    num_groups = issues.shape[0]
    capacity_G = capacity_G.long()
    num_valid_G = torch.full_like(capacity_G, size) if valid_T is None else valid_T.view(-1, size).sum(1)
    # each group's first flagged check (the columns hold SCORES, SHORT, INFEASIBLE, PRICES)
    codes_G4 = torch.arange(SCORES, PRICES + 1, device=issues.device).expand(num_groups, 4)
    code_G = torch.where(issues > 0, codes_G4, PRICES + 1).min(1).values
    code_G = torch.where(code_G > PRICES, 0, code_G)
    token_G = torch.where(code_G == SCORES, issues[:, 0], torch.where(code_G == SHORT, issues[:, 1], 1)) - 1
    groups_G = torch.arange(num_groups, device=issues.device)
    sizes_G = torch.full_like(code_G, size)
    rows_G6 = torch.stack([code_G, groups_G, token_G, sizes_G, capacity_G, num_valid_G], 1)
    first = (code_G > 0).int().argmax().view(1)  # the first group with an issue (0 when none)
    _keep_first(record, rows_G6.index_select(0, first)[0])


def _keep_first(record: torch.Tensor, new: torch.Tensor) -> None:
    record.copy_(torch.where(record[0] > 0, record, new.to(record.device)))


def message(record: list[int], k: int, num_experts: int) -> str:
    """The eager check's message for a record (code > 0)."""
    code, group, token, size, capacity, num_valid = record
    rows = torch.tensor([group * size + token])
    if code == LOGITS:
        return logits_message(f" (group {group}, token {token})")
    if code == SCORES:
        return nonfinite_message(rows, size)
    if code == SHORT:
        return short_message(rows, k, size)
    if code == INFEASIBLE:
        return infeasible_message(capacity, num_experts, k, num_valid, group)
    return f"{PRICES_MESSAGE} (group {group})"


def check_routing(model: nn.Module) -> None:
    """Raises the first bad input any router in ``model`` recorded since the last check (one
    transfer for all of them), as ``ValueError("<module name>: <message>")``; clears the records.

    Call it at a point where waiting for the device costs nothing extra (after the optimizer
    step: ``step_routers`` does), or after any forward while debugging.
    """
    routers = [(name or "router", m) for name, m in model.named_modules() if hasattr(m, "routing_issue")]
    if not routers:
        return
    device = routers[0][1].routing_issue.device
    records = torch.stack([m.routing_issue.to(device) for _, m in routers]).tolist()  # the one transfer
    found = [(name, m, r) for (name, m), r in zip(routers, records, strict=True) if r[0] > 0]
    for _, m, _ in found:
        m.routing_issue.zero_()
    if found:
        name, m, record = found[0]
        raise ValueError(f"{name}: {message(record, m.k, m.num_experts)}")
