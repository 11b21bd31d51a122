"""What runs in the cloud: the cloud LLM as a Ray Serve deployment (llama.cpp on CPU, vLLM on
GPU, or any OpenAI-compatible endpoint). Built in the serving-plane issue.
"""
