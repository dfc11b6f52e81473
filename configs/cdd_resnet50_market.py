# Capacity Dynamic Distillation (CDD, CVPR 2023) with RGGR for person re-ID on Market-1501:
# ResNet-50 teacher -> heavy ResNet-50 student, compressed while it trains, merged after
# training (<work_dir>/model_merged.pth, <work_dir>/cdd_summary.json). Evaluation is the
# camera-aware re-ID protocol (mAP, mINP, CMC; same-identity same-camera gallery images
# removed), no re-ranking.
#
#   mim train mmpretrain configs/cdd_resnet50_market.py --work-dir work_dirs/cdd_market
#   mim test  mmpretrain configs/cdd_resnet50_market.py --checkpoint work_dirs/cdd_market/model_merged.pth
#
# The teacher is an MMPretrain retriever with the same ResNet-50 + pooling + 751-way
# classifier trained on Market-1501 (for instance configs/teacher_resnet50_sop.py with this
# file's dataloaders, num_classes=751 and input_size); set `teacher_checkpoint` below.
# Set `data_root` below (a --cfg-options override must name each dataloader's data_root).
_base_ = [
    './_base_/cdd_plugin_check.py',
    'mmpretrain::_base_/default_runtime.py',
]

# folder with bounding_box_train/, query/, bounding_box_test/ (or the folder containing
# Market-1501-v15.09.15/)
data_root = 'data/Market-1501-v15.09.15'
teacher_checkpoint = 'work_dirs/teacher_market/epoch_120.pth'

custom_imports = dict(imports=['cdd_plugin.integrations.mmpretrain'], allow_failed_imports=False)

num_classes = 751  # Market-1501 training identities
input_size = (256, 128)  # (H, W) person crops
pretrained = 'https://download.openmmlab.com/mmclassification/v0/resnet/resnet50_8xb32_in1k_20210831-ea4938fc.pth'  # noqa

model = dict(
    type='CDDRetriever',
    image_encoder=[
        dict(type='ResNet', depth=50,
             init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone')),
        dict(type='GlobalAveragePooling'),
    ],
    head=dict(type='LinearClsHead', num_classes=num_classes, in_channels=2048),
    teacher=dict(checkpoint=teacher_checkpoint),
    cdd=dict(lasso=0.004, threshold=1e-5, criterion='rggr', k=2, ratio=0.5, queue_size=24000, metric='cosine',
             mask_start_epoch=20),
    losses=dict(ce_weight=1.0, label_smoothing=0.1, triplet_weight=1.0, triplet_margin=0.3,
                kd_weight=1.0, temperature=2.0, feat_weight=0.5),
    input_size=input_size,
    data_preprocessor=dict(
        num_classes=num_classes,
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        to_rgb=True),
)

# the authors' augmentation: flip, padding 10 + random crop, random erasing 0.5
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(input_size[1], input_size[0]), interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='RandomCrop', crop_size=input_size, padding=10),
    dict(type='RandomErasing', erase_prob=0.5, mode='const', fill_color=0),
    dict(type='PackInputs'),
]
# camid / is_query reach ReIDMetric through PackInputs' algorithm_keys
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(input_size[1], input_size[0]), interpolation='bicubic'),
    dict(type='PackInputs', algorithm_keys=('camid', 'is_query')),
]

# persistent_workers stays False: torch refuses it with num_workers=0
train_dataloader = dict(
    batch_size=64,
    num_workers=4,
    persistent_workers=False,
    dataset=dict(type='Market1501', data_root=data_root, split='train', pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
    # P x K batches: 16 identities x 4 images
    batch_sampler=dict(type='PKBatchSampler', instances=4),
)
val_dataloader = dict(
    batch_size=128,
    num_workers=4,
    persistent_workers=False,
    # query images followed by gallery images, each flagged is_query
    dataset=dict(type='Market1501', data_root=data_root, split='test', pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='ReIDMetric', ranks=(1, 5, 10), metric='cosine')
test_dataloader = val_dataloader
test_evaluator = val_evaluator

optim_wrapper = dict(
    type='CDDOptimWrapper',
    constructor='CDDOptimWrapperConstructor',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True),
    paramwise_cfg=dict(custom_keys={'cdd_dgc': dict(decay_mult=0.0)}),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=True, begin=0, end=10, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=110, by_epoch=True, begin=10, end=120, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=120, val_interval=10)
val_cfg = dict()
test_cfg = dict()

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    # atomic_local (cdd_plugin): every checkpoint is written to a temporary file, fsync'ed and renamed, so
    # an interrupted save never leaves a truncated file or loses the previous one (local paths only)
    checkpoint=dict(type='CheckpointHook', interval=10, max_keep_ckpts=2,
                    backend_args=dict(backend='atomic_local')),
)
# distributed training on CPUs (torchrun ... --launcher pytorch, no CUDA): add
# env_cfg = dict(dist_cfg=dict(backend='gloo'))
custom_hooks = [dict(type='CDDHook')]
