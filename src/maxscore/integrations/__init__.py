"""Drop-in MaxScore routers for other training frameworks, one module per framework (adapters
only; each framework is an optional extra, pinned to the version tested):

- ``maxscore.integrations.megatron``: Megatron-Core (``pip install 'maxscore[megatron]'``).
- ``maxscore.integrations.torchtitan``: torchtitan (``pip install 'maxscore[torchtitan]'``).

Nothing else in the package imports these modules.
"""
