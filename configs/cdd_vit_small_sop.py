# CDD with RGGR on a vision transformer (beyond the paper, which is CNN-only), Stanford Online
# Products: a trained ViT-S/16 (DeiT-small) teacher distils into a heavy ViT-S/16 student whose MLP
# hidden dimension (Linear -> GELU -> Linear, 1536 wide in each of the 12 blocks) is compacted while
# it trains. The compactor sits after each block's first MLP Linear and folds into it at merge; the
# second Linear loses the matching input columns (GELU(0) = 0 keeps the cut exact). Attention stays
# dense. sites='paper' (the set that feeds a residual block's last layer) selects exactly these 12
# sets; RGGR and the feature term read them pooled over all tokens (the class token included).
# After training CDDHook merges the student into a ViT with narrower MLPs and writes
# <work_dir>/model_merged.pth and <work_dir>/cdd_summary.json.
#
#   mim train mmpretrain configs/teacher_vit_small_sop.py --work-dir work_dirs/teacher_vit_sop
#   mim train mmpretrain configs/cdd_vit_small_sop.py --work-dir work_dirs/cdd_vit_sop
#   mim test  mmpretrain configs/cdd_vit_small_sop.py --checkpoint work_dirs/cdd_vit_sop/model_merged.pth
#
# Everything else (data, the CDD schedule: SGD, 120 epochs; the paper has no transformer recipe)
# is configs/cdd_resnet50_sop.py's. Set `data_root` there (or override each dataloader's) and the
# teacher checkpoint below.
_base_ = ['./cdd_resnet50_sop.py', './_base_/models/vit_small_encoder.py']
model = dict(
    image_encoder={{_base_.vit_small_encoder}},
    head=dict(in_channels=384),
    # the 12 sites hold 18,432 channels: queues of 24,000 take 1.7 GiB in float32, 0.8 in bfloat16
    cdd=dict(queue_dtype='bfloat16'),
    teacher=dict(checkpoint='work_dirs/teacher_vit_sop/epoch_100.pth'),  # teacher_vit_small_sop.py's last
)
