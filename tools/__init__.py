"""Developer tooling, not part of the node pack's runtime: random test models (``tiny``) and the
UI->API workflow converter (``workflow_api``). Imported as ``tools.<module>`` with the repo root on
``sys.path`` (tests, ``training/demo.py``, ``bench/``)."""
