"""Router variants for ``maxscore compare``: one router name with settings, as one label.

Syntax (one entry of the comma-separated ``--routers``)::

    ROUTER[@METHOD][:KEY=VALUE]...

``@METHOD`` is the router's solver method (``maxscore@two_stage``).  Each ``:KEY=VALUE`` sets
a training or model setting when KEY is one (``capacity_factor``, ``k``, ``lr``, ...) and a
router option otherwise (``normalize``, ``balance_coef``, ...); a dotted key sets a field of a
router option given as a dict (``schedule.start=2``).  VALUE is JSON when it parses
(``true``, ``1.25``, ``"x"``), else a plain string; ``schedule.steps`` also takes a share of
the run, ``10%``.  Examples::

    gshard:normalize=false                        GShard with raw combine weights
    maxscore:soft_topk=true:schedule.steps=10%    SoftTopk 4 -> 1 over the first 10% of the run
    flow_only:normalize=true:capacity_factor=1.25

The label itself goes into ``final.json["router"]`` and the report; the run folder is the
label with every character outside ``[A-Za-z0-9._=@-]`` replaced (``:`` -> ``+``, ``%`` ->
``pct``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from maxscore.train.config import MODEL_FIELDS, TRAIN_FIELDS

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


@dataclass(frozen=True)
class Variant:
    """One configuration of a comparison: ``router`` with ``settings`` and ``options``."""

    label: str
    router: str
    settings: dict = field(default_factory=dict)  # TrainConfig / ModelConfig fields
    options: dict = field(default_factory=dict)  # router options (dotted keys already nested)

    @property
    def folder(self) -> str:
        """A filesystem-safe folder name for the label."""
        name = self.label.replace(":", "+").replace("%", "pct")
        return re.sub(r"[^A-Za-z0-9._=@+-]", "_", name)

    def overrides(self, steps: int) -> dict:
        """``make_config`` overrides for a run of ``steps`` steps (shares of the run resolved)."""
        options = {
            name: dict(value) if isinstance(value, dict) else value for name, value in self.options.items()
        }
        schedule = options.get("schedule")
        if isinstance(schedule, dict) and isinstance(schedule.get("steps"), str):
            schedule["steps"] = max(1, round(steps * float(schedule["steps"].rstrip("%")) / 100))
        return {**self.settings, **({"router_options": options} if options else {})}


def parse_variants(text: str) -> list[Variant]:
    """The comma-separated variants of ``--routers``; duplicate labels are an error."""
    labels = [part.strip() for part in text.split(",") if part.strip()]
    if not labels:
        raise ValueError("--routers is empty; give at least one router, e.g. maxscore,gshard")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"--routers lists {duplicates} more than once")
    variants = [parse_variant(label) for label in labels]
    folders = [v.folder for v in variants]
    clashes = sorted({f for f in folders if folders.count(f) > 1})
    if clashes:
        raise ValueError(f"--routers: different labels map to the same run folder {clashes}; rename one")
    return variants


def parse_variant(label: str) -> Variant:
    """One ``ROUTER[@METHOD][:KEY=VALUE]...`` label (see the module docstring)."""
    head, *assignments = label.split(":")
    router, _, method = head.partition("@")
    if not router:
        raise ValueError(f"variant {label!r} has no router name; write ROUTER[@METHOD][:KEY=VALUE]...")
    settings: dict = {"k": 1} if router == "switch" else {}
    options: dict = {"method": method} if method else {}
    for assignment in assignments:
        key, equals, text = assignment.partition("=")
        if not equals or not _KEY.match(key):
            raise ValueError(
                f"variant {label!r}: {assignment!r} is not KEY=VALUE (e.g. normalize=true, schedule.start=2)"
            )
        value = _value(key, text, label)
        name, _, sub = key.partition(".")
        if sub:
            nested = options.setdefault(name, {})
            if not isinstance(nested, dict):
                raise ValueError(f"variant {label!r}: {name} is set both as a value and by field")
            nested[sub] = value
        elif name in MODEL_FIELDS | TRAIN_FIELDS:
            if name in ("router", "router_options", "model", "label", "seed"):
                raise ValueError(f"variant {label!r}: {name} cannot be set in a variant")
            settings[name] = value
        else:
            options[name] = value
    return Variant(label=label, router=router, settings=settings, options=options)


def _value(key: str, text: str, label: str):
    if key == "schedule.steps" and text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            share = -1.0
        if not 0 < share <= 100:
            raise ValueError(f"variant {label!r}: schedule.steps={text} must be a share in (0%, 100%]")
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
