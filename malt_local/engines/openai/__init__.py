"""`--engine openai`: any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp's
llama-server, llama-cpp-python's server, hosted APIs), one or many endpoints at once.

`settings` holds what the user chose, `probe` asks each server what it serves, `routing` keeps
each question's tree on one healthy endpoint, `http` is the small asyncio client and `engine`
turns `GenRequest`s into requests.
"""
