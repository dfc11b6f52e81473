# The ResNet-50 teacher for configs/cdd_resnet50_sop.py on Stanford Online Products: an ordinary
# MMPretrain retriever evaluated with SOP Recall@K (own image excluded).
#
#   mim train mmpretrain configs/teacher_resnet50_sop.py --work-dir work_dirs/teacher_sop
#
# Then set `teacher_checkpoint` in configs/cdd_resnet50_sop.py to its last checkpoint
# (work_dirs/teacher_sop/epoch_100.pth). Set `data_root` below first.
_base_ = [
    './_base_/cdd_plugin_check.py',
    './_base_/models/resnet50_retriever.py',
    './_base_/datasets/sop.py',
    './_base_/schedules/teacher_100e.py',
    './_base_/cdd_runtime.py',
]
data_root = 'data/Stanford_Online_Products'
num_classes = 11318  # SOP training classes

model = dict(head=dict(num_classes=num_classes), data_preprocessor=dict(num_classes=num_classes))
# a plain classifier: no P x K batches
train_dataloader = dict(dataset=dict(data_root=data_root), batch_sampler=None)
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = dict(dataset=dict(data_root=data_root))
