"""Pictures and the HTML report (the optional ``plot`` extra): figures are returned, never shown;
matplotlib and circuitsvis are imported only inside the functions that draw."""

from tl_tensorlens.viz.summary import AnswerRank, PredictionSummary, prediction_summary

__all__ = ["AnswerRank", "PredictionSummary", "prediction_summary"]
