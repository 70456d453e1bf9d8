"""Small helpers shared by the maformer-zoo models, tests and benchmark scripts."""
from .flops import count_flops, count_params

__all__ = ['count_flops', 'count_params']
