"""``python -m trajflow_t2i``: the ``trajflow-t2i`` command line."""

from trajflow_t2i.cli import main

main()
