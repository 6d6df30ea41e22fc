"""Datasets for FLUID training: dataset_info.json registries, alpaca / sharegpt, chat templates.

``build_sft_dataset(args, tokenizer)`` is the entry point; ``token_occurs`` serves the MASK-token
check; ``get_template`` / ``TEMPLATES`` render conversations for training and for inference.
"""

from typing import TYPE_CHECKING

from fluid_npu import lazy_exports

if TYPE_CHECKING:
    from fluid_npu.data.auto_template import TokenizerChatTemplate, get_template
    from fluid_npu.data.loader import (
        IGNORE_INDEX,
        DataStats,
        SFTData,
        build_sft_dataset,
        token_occurs,
    )
    from fluid_npu.data.templates import (
        TEMPLATES,
        ChatTemplate,
        Conversation,
        Encoded,
    )

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "ChatTemplate",
    "Conversation",
    "DataStats",
    "Encoded",
    "SFTData",
    "TokenizerChatTemplate",
    "build_sft_dataset",
    "get_template",
    "token_occurs",
]

if not TYPE_CHECKING:  # (a checker reads the imports above, and knows every name)
    __getattr__, __dir__ = lazy_exports(
        __name__,
        {
            "loader": ("IGNORE_INDEX", "DataStats", "SFTData", "build_sft_dataset", "token_occurs"),
            "templates": (
                "TEMPLATES",
                "ChatTemplate",
                "Conversation",
                "Encoded",
            ),
            "auto_template": ("TokenizerChatTemplate", "get_template"),
        },
    )
