"""Framework adapters of cdd_plugin (``cdd_plugin.integrations.fastreid``, ``cdd_plugin.integrations.mmpretrain``)."""
