"""`make bench`: the throughput of node-by-node, the batched engine, raw decode and
llama-server on one tree (`throughput`), and the llama-server launcher it uses (`llama_server`).
"""
