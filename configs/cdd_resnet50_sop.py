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
_base_ = [
    './_base_/cdd_plugin_check.py',
    './_base_/models/cdd_resnet50.py',
    './_base_/datasets/sop.py',
    './_base_/schedules/cdd_120e.py',
    './_base_/cdd_runtime.py',
]
data_root = 'data/Stanford_Online_Products'
teacher_checkpoint = 'work_dirs/teacher_sop/epoch_100.pth'  # the last checkpoint of teacher_resnet50_sop.py
num_classes = 11318  # SOP training classes

model = dict(head=dict(num_classes=num_classes), data_preprocessor=dict(num_classes=num_classes),
             teacher=dict(checkpoint=teacher_checkpoint), input_size=(224, 224))
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = dict(dataset=dict(data_root=data_root))
# CDD figures in the logs; after training: merge, evaluate, model_merged.pth, cdd_summary.json
custom_hooks = [dict(type='CDDHook')]
