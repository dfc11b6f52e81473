# The authors' schedule: SGD (momentum 0.9) base LR 0.01, classifier x1.5, weight decay 5e-4 on
# every parameter (model.cdd.decay_compactors decides for the compactors), 120 epochs: warm-up 10
# epochs from 0.1x, LR flat until epoch 40, cosine to 1e-7 at 120. The RGGR gradient step lives in
# the optimizer wrapper. The authors train with mixed precision: on a GPU set
# optim_wrapper.type='CDDAmpOptimWrapper' (mim's --amp flag only accepts mmengine's own types).
optim_wrapper = dict(
    type='CDDOptimWrapper',
    constructor='CDDOptimWrapperConstructor',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=5e-4),
    paramwise_cfg=dict(custom_keys={'head': dict(lr_mult=1.5)}),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=10, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=80, eta_min=1e-7, by_epoch=True, begin=40, end=120,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=120, val_interval=10)
val_cfg = dict()
test_cfg = dict()
