from finetune.core.hardware import detect, profile_for, resolve_compute_dtype


def test_cpu_uses_float32():
    assert profile_for("cpu", "CPU", 24.0).compute_dtype == "float32"


def test_t4_uses_float16_by_capability():
    # torch.cuda.is_bf16_supported() says True on a T4; the capability (7.5) is what decides.
    t4 = profile_for("cuda", "Tesla T4", 15.6, (7, 5))
    assert t4.compute_dtype == "float16"
    assert "7.5" in t4.summary()


def test_ampere_and_newer_use_bfloat16():
    assert profile_for("cuda", "A100", 80.0, (8, 0)).compute_dtype == "bfloat16"
    assert profile_for("cuda", "H100", 80.0, (9, 0)).compute_dtype == "bfloat16"


def test_detect_on_this_machine_matches_torch():
    import torch

    profile = detect()
    assert profile.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert profile.memory_gb > 0
    assert resolve_compute_dtype("auto", profile) == getattr(torch, profile.compute_dtype)
    assert resolve_compute_dtype("float16", profile) == torch.float16
