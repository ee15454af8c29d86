"""``python -m runtime deploy``: SageMaker deployment of an artifact (cli), sized against an instance table (fit),
as a planned list of API calls (sagemaker)."""
