# The run-time of every cdd_plugin MMPretrain config: the plug-in imported, logs every 50
# iterations, checkpoints every 10 epochs through the atomic_local file backend (every checkpoint
# is written to a temporary file, fsync'ed and renamed: an interrupted save never leaves a truncated
# file or loses the previous one; local paths only).
# Distributed training on CPUs (torchrun ... --launcher pytorch, no CUDA): add
# env_cfg = dict(dist_cfg=dict(backend='gloo')).
_base_ = ['mmpretrain::_base_/default_runtime.py']
custom_imports = dict(imports=['cdd_plugin.integrations.mmpretrain'], allow_failed_imports=False)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='CheckpointHook', interval=10, max_keep_ckpts=2, backend_args=dict(backend='atomic_local')),
)
