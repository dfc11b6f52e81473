# The ViT-S/16 (DeiT-small, ImageNet weights) teacher for configs/cdd_vit_small_sop.py on Stanford
# Online Products: configs/teacher_resnet50_sop.py with the image encoder swapped; the class token
# after the final LayerNorm is the 384-d embedding.
#
#   mim train mmpretrain configs/teacher_vit_small_sop.py --work-dir work_dirs/teacher_vit_sop
_base_ = ['./teacher_resnet50_sop.py']
pretrained = 'https://download.openmmlab.com/mmclassification/v0/deit/deit-small_pt-4xb256_in1k_20220218-9425b9bb.pth'  # noqa
model = dict(
    image_encoder=[dict(type='VisionTransformer', arch='deit-small', img_size=224, patch_size=16,
                        out_type='cls_token', init_cfg=dict(type='Pretrained', checkpoint=pretrained,
                                                            prefix='backbone'))],
    head=dict(in_channels=384),
)
