"""What runs on an edge box: a llama.cpp SLM worker served over gRPC that registers with the
cluster's EdgeRegistry. Installs with ``pip install 'hera-ray[edge]'``: no Ray, no torch.
"""
