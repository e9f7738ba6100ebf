"""The app services: what the tabs call. Runs and their queue, chat, feedback, evaluation, benchmarks, quantization,
export and GGUF, comparisons and sweeps, deployment, the course. They reach the training stages only through the
child process ``python -m finetune.train``, and read what it writes through finetune.core.run_folder."""
