"""The training stages, one module each: sft, reward, policy (DPO and KTO), grpo; ``runner`` holds the STAGES
table and the shared run. Only the entry point ``python -m finetune.train`` (a child process of the app) runs
them; app services read what they write through finetune.core.run_folder."""
