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
# classifier trained on Market-1501 (for instance configs/teacher_resnet50_sop.py with the
# Market-1501 dataloaders of _base_/datasets/market1501.py, num_classes=751 and 256x128 inputs);
# set `teacher_checkpoint` below. Set `data_root` below.
_base_ = [
    './_base_/cdd_plugin_check.py',
    './_base_/models/cdd_resnet50.py',
    './_base_/datasets/market1501.py',
    './_base_/schedules/cdd_120e.py',
    './_base_/cdd_runtime.py',
]
data_root = 'data/Market-1501-v15.09.15'
teacher_checkpoint = 'work_dirs/teacher_market/epoch_120.pth'
num_classes = 751  # Market-1501 training identities

model = dict(head=dict(num_classes=num_classes), data_preprocessor=dict(num_classes=num_classes),
             teacher=dict(checkpoint=teacher_checkpoint), input_size=(256, 128))
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = dict(dataset=dict(data_root=data_root))
custom_hooks = [dict(type='CDDHook')]
