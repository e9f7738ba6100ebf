"""One module per tab of the app: each has a ``build_*_tab()`` that lays it out and wires its handlers."""
