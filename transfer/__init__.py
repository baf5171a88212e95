"""Fine-tuning and transfer learning of MoCo v3 ViTs (DeiT recipes): ``python -m transfer.finetune``."""
