"""``python -m runtime bench``: a load client for serving endpoints — kiln's, LMI containers', any OpenAI-compatible
server's, and SageMaker endpoints — with ``vllm bench serve``'s metric definitions. Needs only the slim runtime.

``workload`` builds the requests, ``apis`` the schemas, ``transports`` HTTP and SageMaker, ``runner`` the schedule,
``metrics`` the figures, ``cli`` the command.
"""
