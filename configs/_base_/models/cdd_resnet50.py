# CDD on MMPretrain: a trained teacher distils into a heavy ImageNet ResNet-50 student that is
# compressed while it trains (CDDRetriever, an ImageToImageRetriever). Every cdd / losses setting
# not written here takes the default of cdd_plugin.CDDConfig / cdd_plugin.LossConfig, the
# authors' values (lasso 0.004, threshold 1e-5, RGGR K 2 ratio 0.5, queue 24000, cosine, sites
# 'paper', weight decay on the compactors, the feature term 0.5 read before the compactors,
# triplet margin 0.35). Leaves set the classes, the input size and model.teacher.checkpoint.
pretrained = 'https://download.openmmlab.com/mmclassification/v0/resnet/resnet50_8xb32_in1k_20210831-ea4938fc.pth'  # noqa
model = dict(
    type='CDDRetriever',
    image_encoder=[
        dict(type='ResNet', depth=50, init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone')),
        dict(type='GlobalAveragePooling'),
    ],
    # classifier for the identity and logit-distillation losses (its own `loss` is unused)
    head=dict(type='LinearClsHead', num_classes=1000, in_channels=2048),
    # the teacher's architecture defaults to the student's; its weights come from the checkpoint
    teacher=dict(checkpoint='work_dirs/teacher/epoch_100.pth'),
    cdd=dict(mask_start_epoch=20),   # masks may change from epoch 20 (of 120) on
    losses=dict(),
    input_size=(224, 224),
    data_preprocessor=dict(num_classes=1000, mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           to_rgb=True),
)
