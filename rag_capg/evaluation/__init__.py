"""Evaluation: trec_eval metrics and significance tests, TREC run files, ``rag-capg eval`` and its plots."""
