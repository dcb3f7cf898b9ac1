"""finetune.operator"""
