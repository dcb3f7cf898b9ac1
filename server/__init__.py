"""finetune.server"""
