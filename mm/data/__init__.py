"""Data: the shard format, converters' shared code, the streaming loader with packing, a synthetic corpus."""
from mm.data.bad import BadCounter, BadSample
from mm.data.config import DataConfig
from mm.data.loader import build_loader
from mm.data.render import Renderer
from mm.data.shards import ShardWriter, iter_docs, iter_members, list_shards, parse_sample

__all__ = ["DataConfig", "build_loader", "Renderer", "ShardWriter", "iter_docs", "iter_members", "list_shards",
           "parse_sample", "BadCounter", "BadSample", "make_synthetic"]


def make_synthetic(*args, **kwargs):
    """See :func:`mm.data.synthetic.make_synthetic`."""
    from mm.data.synthetic import make_synthetic as make

    return make(*args, **kwargs)
