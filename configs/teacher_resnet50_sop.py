# The ResNet-50 teacher for configs/cdd_resnet50_sop.py on Stanford Online Products: an
# ordinary MMPretrain retriever (ImageNet ResNet-50 + global pooling + classifier trained
# with label-smoothed cross-entropy), evaluated with SOP Recall@K (own image excluded).
#
#   mim train mmpretrain configs/teacher_resnet50_sop.py --work-dir work_dirs/teacher_sop
#
# Then set `teacher_checkpoint` in configs/cdd_resnet50_sop.py to its last checkpoint
# (work_dirs/teacher_sop/epoch_100.pth). Set `data_root` below first.
_base_ = [
    './_base_/cdd_plugin_check.py',
    'mmpretrain::_base_/default_runtime.py',
]

# folder holding Ebay_train.txt, Ebay_test.txt and the class folders (bicycle_final/, ...)
data_root = 'data/Stanford_Online_Products'

custom_imports = dict(imports=['cdd_plugin.integrations.mmpretrain'], allow_failed_imports=False)

num_classes = 11318
input_size = (224, 224)
pretrained = 'https://download.openmmlab.com/mmclassification/v0/resnet/resnet50_8xb32_in1k_20210831-ea4938fc.pth'  # noqa

# EmbeddingRetriever = MMPretrain's ImageToImageRetriever whose predictions carry the
# embeddings SOPRecall needs; the keys of its checkpoint (image_encoder.*, head.*) are what
# CDDRetriever's teacher loads
model = dict(
    type='EmbeddingRetriever',
    image_encoder=[
        dict(type='ResNet', depth=50,
             init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone')),
        dict(type='GlobalAveragePooling'),
    ],
    head=dict(
        type='LinearClsHead',
        num_classes=num_classes,
        in_channels=2048,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original', loss_weight=1.0)),
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

# persistent_workers stays False: torch refuses it with num_workers=0
train_dataloader = dict(
    batch_size=64,
    num_workers=4,
    persistent_workers=False,
    dataset=dict(type='StanfordOnlineProducts', data_root=data_root, split='train', pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
)
val_dataloader = dict(
    batch_size=128,
    num_workers=4,
    persistent_workers=False,
    dataset=dict(type='StanfordOnlineProducts', data_root=data_root, split='test', pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='SOPRecall', topk=(1, 10, 100, 1000))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=True, begin=0, end=5, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=95, by_epoch=True, begin=5, end=100, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=100, val_interval=10)
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
