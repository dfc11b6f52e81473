# Capacity Dynamic Distillation (CDD, CVPR 2023) with RGGR on Stanford Online Products.
# A trained ResNet-50 teacher distils into a heavy ResNet-50 student that is compressed
# while it trains; after training CDDHook merges it into a narrower plain ResNet-50 and
# writes <work_dir>/model_merged.pth and <work_dir>/cdd_summary.json.
#
#   mim train mmpretrain configs/teacher_resnet50_sop.py --work-dir work_dirs/teacher_sop
#   mim train mmpretrain configs/cdd_resnet50_sop.py --work-dir work_dirs/cdd_sop
#   mim test  mmpretrain configs/cdd_resnet50_sop.py --checkpoint work_dirs/cdd_sop/model_merged.pth
#
# Set `data_root` and `teacher_checkpoint` below (a --cfg-options override must name each
# place that uses them, e.g. train_dataloader.dataset.data_root=... and
# val_dataloader.dataset.data_root=..., model.teacher.checkpoint=...).
# Mixed precision: --cfg-options optim_wrapper.type=CDDAmpOptimWrapper (mim's --amp flag
# only accepts mmengine's own wrapper types).
_base_ = [
    './_base_/cdd_plugin_check.py',
    'mmpretrain::_base_/default_runtime.py',
]

# folder holding Ebay_train.txt, Ebay_test.txt and the class folders (bicycle_final/, ...)
data_root = 'data/Stanford_Online_Products'
# the teacher: e.g. the last checkpoint of configs/teacher_resnet50_sop.py
teacher_checkpoint = 'work_dirs/teacher_sop/epoch_100.pth'

custom_imports = dict(imports=['cdd_plugin.integrations.mmpretrain'], allow_failed_imports=False)

num_classes = 11318  # SOP training classes
input_size = (224, 224)  # (H, W) of the training input; FLOPs are counted at this size
pretrained = 'https://download.openmmlab.com/mmclassification/v0/resnet/resnet50_8xb32_in1k_20210831-ea4938fc.pth'  # noqa

model = dict(
    type='CDDRetriever',
    # heavy student: ImageNet ResNet-50 (+ global pooling: the 2048-d retrieval embedding)
    image_encoder=[
        dict(type='ResNet', depth=50,
             init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone')),
        dict(type='GlobalAveragePooling'),
    ],
    # classifier for the identity and logit-distillation losses (its own `loss` is unused)
    head=dict(type='LinearClsHead', num_classes=num_classes, in_channels=2048),
    # teacher architecture defaults to the student's; its weights come from the checkpoint
    teacher=dict(checkpoint=teacher_checkpoint),
    # compression (cdd_plugin.CDDConfig), the authors' defaults
    cdd=dict(
        lasso=0.004,            # group-lasso strength
        threshold=1e-5,         # merge removes DGC rows with a smaller norm
        criterion='rggr',       # retrieval-guided masks ('norm' = ResRep's rule, 'none' = lasso only)
        k=2,                    # neighbours per query in the simulated retrieval
        ratio=0.5,              # fraction of candidate (least contributing) channels per pair
        queue_size=24000,       # teacher feature memory per DGC site
        metric='cosine',
        mask_start_epoch=20,    # masks may change after the warm-up (20 of 120 epochs)
    ),
    # distillation and task losses (cdd_plugin.LossConfig), the authors' defaults
    losses=dict(ce_weight=1.0, label_smoothing=0.1, triplet_weight=1.0, triplet_margin=0.3,
                kd_weight=1.0, temperature=2.0, feat_weight=0.5),
    input_size=input_size,
    data_preprocessor=dict(
        num_classes=num_classes,
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        to_rgb=True),
)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=input_size[0]),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=256, edge='short'),
    dict(type='CenterCrop', crop_size=input_size[0]),
    dict(type='PackInputs'),
]

# persistent_workers stays False: mmpretrain's train.py would default it to True, and torch
# refuses persistent workers with num_workers=0 (a common override when debugging)
train_dataloader = dict(
    batch_size=64,
    num_workers=4,
    persistent_workers=False,
    dataset=dict(type='StanfordOnlineProducts', data_root=data_root, split='train', pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
    # P x K batches (16 products x 4 images) so the triplet loss has positives
    batch_sampler=dict(type='PKBatchSampler', instances=4),
)
val_dataloader = dict(
    batch_size=128,
    num_workers=4,
    persistent_workers=False,
    dataset=dict(type='StanfordOnlineProducts', data_root=data_root, split='test', pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
# every test image queries all the others, its own image excluded
val_evaluator = dict(type='SOPRecall', topk=(1, 10, 100, 1000))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

# RGGR gradient step in the optimizer wrapper; DGCs are exempt from weight decay (the group
# lasso is their regulariser)
optim_wrapper = dict(
    type='CDDOptimWrapper',
    constructor='CDDOptimWrapperConstructor',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True),
    paramwise_cfg=dict(custom_keys={'cdd_dgc': dict(decay_mult=0.0)}),
)
# cosine LR with 10 warm-up epochs, 120 epochs
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
# CDD figures in the logs; after training: merge, evaluate, model_merged.pth, cdd_summary.json
custom_hooks = [dict(type='CDDHook')]
