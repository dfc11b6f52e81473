# Market-1501 person re-ID at 256x128 with the authors' augmentation (flip, padding 10 + random
# crop, random erasing 0.5) and the camera-aware re-ID protocol (ReIDMetric: same identity and
# camera removed from the gallery; mAP, mINP, CMC). Train batches: 16 identities x 4 images.
# data_root: the folder with bounding_box_train/, query/, bounding_box_test/ (or its parent).
data_root = 'data/Market-1501-v15.09.15'
input_size = (256, 128)
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
train_dataloader = dict(
    batch_size=64, num_workers=4, persistent_workers=False,
    dataset=dict(type='Market1501', data_root=data_root, split='train', pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='PKBatchSampler', instances=4),
)
val_dataloader = dict(
    batch_size=128, num_workers=4, persistent_workers=False,
    # query images followed by gallery images, each flagged is_query
    dataset=dict(type='Market1501', data_root=data_root, split='test', pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='ReIDMetric', ranks=(1, 5, 10), metric='cosine')
test_dataloader = val_dataloader
test_evaluator = val_evaluator
