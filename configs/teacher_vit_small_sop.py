# The ViT-S/16 (DeiT-small, ImageNet weights) teacher for configs/cdd_vit_small_sop.py on Stanford
# Online Products: configs/teacher_resnet50_sop.py with the image encoder swapped; the class token
# after the final LayerNorm is the 384-d embedding.
#
#   mim train mmpretrain configs/teacher_vit_small_sop.py --work-dir work_dirs/teacher_vit_sop
_base_ = ['./teacher_resnet50_sop.py', './_base_/models/vit_small_encoder.py']
model = dict(image_encoder={{_base_.vit_small_encoder}}, head=dict(in_channels=384))
