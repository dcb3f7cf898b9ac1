"""finetune.trainer"""
