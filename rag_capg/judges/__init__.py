"""Late-stage rankers (LSRs): frozen judges whose scores of (query, passage) pairs are the reward.

- ``base``: the ``Judge`` protocol, ``JudgeError``, ``LabelOracle`` (relevance labels) and ``CallableJudge``;
- ``models``: ``CrossEncoderJudge``, ``LLMJudge``, ``BiEncoderTeacher``;
- ``bm25``: ``BM25Judge``, BM25 over the corpus standardised per query (no model, no labels);
- ``ensemble``: ``EnsembleJudge``, a weighted sum of standardised member judges, each behind its own cache;
- ``cache``: ``ScoreCache``, scores on disk by (judge, query, passage), and the failure policy;
- ``rewards``: ``pick`` (the LSR's choice from a candidate list) and ``to_reward`` (scores -> rewards >= 0);
- ``build``: ``JudgeArguments`` (the ``lsr_*`` options of train and eval) and ``build_judge``.
"""

from rag_capg.judges.base import CallableJudge, Judge, JudgeError, LabelOracle
from rag_capg.judges.bm25 import BM25Judge
from rag_capg.judges.cache import ScoreCache
from rag_capg.judges.ensemble import EnsembleJudge
from rag_capg.judges.models import DEFAULT_LLM_PROMPT, BiEncoderTeacher, CrossEncoderJudge, LLMJudge
from rag_capg.judges.rewards import pick, to_reward

__all__ = ["Judge", "JudgeError", "LabelOracle", "CallableJudge", "CrossEncoderJudge", "LLMJudge", "BiEncoderTeacher",
           "BM25Judge", "EnsembleJudge", "DEFAULT_LLM_PROMPT", "ScoreCache", "pick", "to_reward"]
