"""The llama.cpp engines (through llama-cpp-python): model loading and chat templates
(`model`, `chat`), node by node (`simple`), batched (`batched`, `sampler`, `sizing`), LoRA
adapter files (`adapters`) and the benchmark's raw decode ceiling (`ceiling`).

Nothing outside this package imports llama_cpp.
"""
