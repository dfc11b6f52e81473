# A plain MMPretrain retriever (the teacher): ImageNet ResNet-50 + global pooling (the 2048-d
# embedding) + a classifier trained with label-smoothed cross-entropy. EmbeddingRetriever is
# MMPretrain's ImageToImageRetriever whose predictions carry the embeddings the retrieval metrics
# need; its checkpoint keys (image_encoder.*, head.*) are what CDDRetriever's teacher loads.
# Leaves set head.num_classes and data_preprocessor.num_classes.
pretrained = 'https://download.openmmlab.com/mmclassification/v0/resnet/resnet50_8xb32_in1k_20210831-ea4938fc.pth'  # noqa
model = dict(
    type='EmbeddingRetriever',
    image_encoder=[
        dict(type='ResNet', depth=50, init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone')),
        dict(type='GlobalAveragePooling'),
    ],
    head=dict(type='LinearClsHead', num_classes=1000, in_channels=2048,
              loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original', loss_weight=1.0)),
    data_preprocessor=dict(num_classes=1000, mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           to_rgb=True),
)
