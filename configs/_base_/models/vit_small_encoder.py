# ViT-S/16 (DeiT-small, ImageNet weights) as an MMPretrain image encoder for retrieval: the class
# token after the final LayerNorm is the 384-d embedding. The ViT leaves (teacher_vit_small_sop.py,
# cdd_vit_small_sop.py) put it in model.image_encoder with {{_base_.vit_small_encoder}}.
vit_small_encoder = [
    dict(type='VisionTransformer', arch='deit-small', img_size=224, patch_size=16, out_type='cls_token',
         init_cfg=dict(type='Pretrained', prefix='backbone',
                       checkpoint='https://download.openmmlab.com/mmclassification/v0/deit/'
                       'deit-small_pt-4xb256_in1k_20220218-9425b9bb.pth')),
]
