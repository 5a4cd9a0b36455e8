"""Block-sparse attention: masks, block-sparse flash attention, top-k blocks, decode."""

from ops.attention.api import BlockSizes
from ops.attention.api import block_sparse_attention
from ops.attention.api import decode_attention
from ops.attention.api import quest_scores
from ops.attention.api import topk_block_attention
from ops.attention.masks import BlockLayout
from ops.attention.masks import CausalMask
from ops.attention.masks import ChunkedMask
from ops.attention.masks import DenseMask
from ops.attention.masks import FullMask
from ops.attention.masks import GlobalTokensMask
from ops.attention.masks import LocalMask
from ops.attention.masks import Mask
from ops.attention.masks import ShiftedGroupMask
from ops.attention.masks import block_kinds
from ops.attention.masks import block_layout
from ops.attention.reference import attention_reference
