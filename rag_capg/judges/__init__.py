"""Late-stage rankers (LSRs): frozen judges whose scores of (query, passage) pairs are the reward.

- ``base``: the ``Judge`` protocol, ``JudgeError``, ``LabelOracle`` (relevance labels) and ``CallableJudge``;
- ``models``: ``CrossEncoderJudge``, ``LLMJudge``, ``BiEncoderTeacher``;
- ``cache``: ``ScoreCache``, scores on disk by (judge, query, passage), and the failure policy;
- ``rewards``: ``pick`` (the LSR's choice from a candidate list) and ``to_reward`` (scores -> rewards >= 0);
- ``build``: ``JudgeArguments`` (the ``lsr_*`` options of train and eval) and ``build_judge``.
"""

from rag_capg.judges.base import CallableJudge, Judge, JudgeError, LabelOracle
from rag_capg.judges.cache import ScoreCache
from rag_capg.judges.models import DEFAULT_LLM_PROMPT, BiEncoderTeacher, CrossEncoderJudge, LLMJudge
from rag_capg.judges.rewards import pick, to_reward

__all__ = ["Judge", "JudgeError", "LabelOracle", "CallableJudge", "CrossEncoderJudge", "LLMJudge", "BiEncoderTeacher",
           "DEFAULT_LLM_PROMPT", "ScoreCache", "pick", "to_reward"]
