# Inherited by the cdd_plugin MMPretrain configs. mmengine reads bases before it runs the
# config's `custom_imports`, so this check can say how to install the plug-in when it is
# missing (mmengine's own message only mentions PYTHONPATH). It defines no config keys.
try:
    _found = __import__('importlib.util', fromlist=['find_spec']).find_spec(
        'cdd_plugin.integrations.mmpretrain') is not None
except ModuleNotFoundError:  # the parent package `cdd_plugin` itself is missing
    _found = False
if not _found:
    raise ImportError(
        'cdd_plugin (module cdd_plugin.integrations.mmpretrain) is not installed in this Python '
        'environment, but this config uses it. Fix: run `make install`, or '
        "`pip install -e '.[mmpretrain]'` (`pip install -e .` for the plug-in alone), in the "
        'cdd_plugin repository, with the Python that runs mim.')
del _found
