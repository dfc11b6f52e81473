# Stanford Online Products: every test image queries all the others (its own image excluded),
# Recall@1/10/100/1000 (SOPRecall). Train batches hold 16 products x 4 images (PKBatchSampler)
# so the triplet loss has positives. data_root: the folder with Ebay_train.txt, Ebay_test.txt
# and the class folders; leaves override it in each dataloader.
data_root = 'data/Stanford_Online_Products'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=224),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=256, edge='short'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
# persistent_workers stays False: mmpretrain's train.py would default it to True, and torch
# refuses persistent workers with num_workers=0 (a common override when debugging)
train_dataloader = dict(
    batch_size=64, num_workers=4, persistent_workers=False,
    dataset=dict(type='StanfordOnlineProducts', data_root=data_root, split='train', pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='PKBatchSampler', instances=4),
)
val_dataloader = dict(
    batch_size=128, num_workers=4, persistent_workers=False,
    dataset=dict(type='StanfordOnlineProducts', data_root=data_root, split='test', pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='SOPRecall', topk=(1, 10, 100, 1000))
test_dataloader = val_dataloader
test_evaluator = val_evaluator
