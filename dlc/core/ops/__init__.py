"""The primitive op set: every op is one OpDef record in one of these modules."""
from dlc.core.ops.base import OPS, Kind, OpDef
from dlc.core.ops.collective import ALLREDUCE
from dlc.core.ops.elementwise import (ABS, ADD, AND, CAST, DIV, EQ, EXP, GE, GT, LE, LOG, LT, MAX, MIN, MUL, NE,
                          NEG, POW, SIGMOID, SIGN, SQRT, STOP_GRADIENT, SUB, TANH, WHERE)
from dlc.core.ops.linalg import BATCH_MATMUL, CONV2D, CONV2D_BWD_DATA, CONV2D_BWD_FILTER, MATMUL, POOL2D, POOL2D_BWD
from dlc.core.ops.misc import CONST, INPUT, IOTA, RANDOM, SCATTER_ADD, SIZE, TAKE
from dlc.core.ops.movement import BROADCAST, CONCAT, PAD, PERMUTE, RESHAPE, SLICE
from dlc.core.ops.reduce import ARGMAX, REDUCE_MAX, REDUCE_SUM
from dlc.core.ops.scan import SCAN, SCAN_RESULT

__all__ = [
    "OPS", "Kind", "OpDef",
    "ABS", "ADD", "AND", "CAST", "DIV", "EQ", "EXP", "GE", "GT", "LE", "LOG", "LT", "MAX", "MIN",
    "MUL", "NE", "NEG", "POW", "SIGMOID", "SIGN", "SQRT", "STOP_GRADIENT", "SUB", "TANH", "WHERE",
    "BATCH_MATMUL", "CONV2D", "CONV2D_BWD_DATA", "CONV2D_BWD_FILTER", "MATMUL", "POOL2D", "POOL2D_BWD",
    "CONST", "INPUT", "IOTA", "RANDOM", "SCATTER_ADD", "SIZE", "TAKE",
    "BROADCAST", "CONCAT", "PAD", "PERMUTE", "RESHAPE", "SLICE",
    "ARGMAX", "REDUCE_MAX", "REDUCE_SUM",
    "SCAN", "SCAN_RESULT",
    "ALLREDUCE",
]
