"""The application on top of the method package: the ``cdd`` command (``cli``) and its demo
(``demo``). Nothing in ``cdd_plugin`` imports from here."""
