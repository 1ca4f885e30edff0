"""Catalogue of models from the libraries users bring their convolutions from (issue 10, point 7).

Each :class:`Entry` builds one model with random weights from a tiny configuration, plus the inputs it is
called with: ``build()`` returns ``(model, example_inputs, example_kwargs)``, the model in eval mode, built
on the CPU in float32, so that ``model(*example_inputs, **example_kwargs)`` runs in well under a second on
one thread. Nothing is downloaded: every model comes from a config or a constructor (never
``from_pretrained`` or ``pretrained=True``), and :func:`offline` sets ``HF_HUB_OFFLINE=1`` for the Hugging
Face libraries and ``YOLO_OFFLINE=1`` for ultralytics, whose settings file it puts in a temporary directory.

Families (one per library; each library is imported only inside the builders, so the catalogue imports
without any of them, and :data:`LIBRARY` names the module to ``pytest.importorskip``):

* ``transformers``: Hugging Face models with convolutions: patch embeddings (ViT, DeiT, BEiT, ...), conv
  nets (ResNet, ConvNeXt, EfficientNet, MobileNets with TF-style dynamic padding, ...), hybrid and detection
  or segmentation heads (MobileViT, CvT, SegFormer, DPT, YOLOS), conv1d audio front ends with weight-norm
  positional convolutions (wav2vec2 in both normalisation layouts, HuBERT, SEW, UniSpeech, WavLM, Whisper,
  Speech2Text) and grouped or separable conv1d in text models (ConvBERT, SqueezeBERT, CANINE);
* ``timm``: every 'same'-padding (``Conv2dSame``, static 'same' padding) and weight-standardised conv
  variant (``StdConv2d``, ``StdConv2dSame``, ``ScaledStdConv2d``, ``ScaledStdConv2dSame``) timm has,
  mixed and conditional convs, and a broad sample of its other architectures;
* ``monai`` (3-d segmentation networks), ``diffusers`` (UNets, VAE, VQ model), ``smp``
  (segmentation-models-pytorch encoders and decoders);
* ``ultralytics``: YOLO detection and segmentation models from the yaml files ultralytics ships (YOLOv8,
  YOLO11, the NMS-free YOLO26), whose heads decode boxes on anchors they cache per input shape;
* ``torchaudio``: wav2vec2 in both layouts (the group-norm, post-norm one is HuBERT's too), WavLM and the
  Conformer (depthwise conv1d) from ``torchaudio.models``' constructors, called with and without ``lengths``;
* ``speechbrain``: the x-vector TDNN and ECAPA-TDNN speaker embedders (dilated conv1d, Res2Net and
  squeeze-excitation blocks, attentive statistics pooling), called with relative ``lengths``.

A builder raises :class:`Unavailable` when the installed version of its library lacks the model.

Dropout, drop-path, layer-drop and SpecAugment-style masking are switched off in every configuration
(and by :func:`no_randomness` in every model built), so that a model in training mode computes a
deterministic function of its input (batch norm then uses batch
statistics, which is what the train-mode comparison exercises). Image batches hold two samples so that
training-mode batch norm sees more than one value per channel. Where batch statistics over the last, smallest
feature maps are ill-conditioned (weights changed by float32 rounding, 1e-7 relative, change the training-mode
output by much more than 1e-5, relative), the entry uses a larger image or batch instead
(``benchmarks/zoo_libraries.py`` measures this sensitivity).

:data:`FAST` is a subset spread over the families that runs by default (about a minute on one thread).
``benchmarks/zoo_libraries.py`` checks the catalogue itself against ``torch.export`` and
``torch.fx.symbolic_trace``; ``tests/test_zoo_libraries.py`` runs ipfx over it.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Callable

import torch
import torch.nn as nn

Built = tuple[nn.Module, tuple, dict]


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    family: str
    build: Callable[[], Built]  # (model in eval mode, example_inputs, example_kwargs); seed before calling
    requires: tuple[str, ...] = ()  # optional modules this entry needs besides its library

    @property
    def id(self) -> str:
        return f"{self.family}/{self.name}"

    @property
    def modules(self) -> tuple[str, ...]:
        """Every module the entry imports (to ``pytest.importorskip``)."""
        return (LIBRARY[self.family], *self.requires)


class Unavailable(RuntimeError):
    """The installed version of the library lacks this entry's model (the tests skip it)."""


#: The module each family needs (for ``pytest.importorskip``).
LIBRARY = {
    "transformers": "transformers",
    "timm": "timm",
    "monai": "monai",
    "diffusers": "diffusers",
    "smp": "segmentation_models_pytorch",
    "ultralytics": "ultralytics",
    "torchaudio": "torchaudio",
    "speechbrain": "speechbrain",
}


def offline() -> None:
    """Make the Hugging Face libraries and ultralytics fail rather than reach the network.

    Ultralytics reads its variables when it is first imported: it then writes a settings file into
    ``YOLO_CONFIG_DIR`` (here a temporary directory, unless one is set), and with ``YOLO_OFFLINE`` it skips
    its connectivity check.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_VERBOSE", "0")
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), f"ipfx-zoo-ultralytics-{os.getuid()}"))


def no_randomness(model: nn.Module) -> nn.Module:
    """Switch off dropout-like randomness that the configuration left on (returns ``model``).

    Dropout modules get ``p = 0``, and every float attribute with "drop" in its name is set to 0: drop-path
    modules (``drop_prob``) and the rates that forwards pass to ``F.dropout`` or to a drop-path function
    (timm's ``drop_rate``, efficientnet-pytorch's ``_drop_connect_rate``).
    """
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for key, value in list(vars(m).items()):
            if "drop" in key and isinstance(value, float):
                setattr(m, key, 0.0)
    return model


def _images(n: int = 2, c: int = 3, *size: int) -> torch.Tensor:
    return torch.randn(n, c, *size)


# -- Hugging Face transformers ----------------------------------------------------------------------------
_NO_RANDOMNESS = ("dropout", "drop_path", "layerdrop", "drop_rate", "drop_connect", "mask_time_prob",
                  "mask_feature_prob")


def _deterministic(config) -> None:
    """Zero every dropout-like probability of a transformers config (scalars and per-stage lists)."""
    for key, value in config.to_dict().items():
        if not any(word in key for word in _NO_RANDOMNESS):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(config, key, type(value)(0))  # some configs validate the type
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            setattr(config, key, [type(v)(0) for v in value])
    if hasattr(config, "apply_spec_augment"):
        config.apply_spec_augment = False


def _hf(config_name: str, model_name: str, inputs: Callable[[], tuple[tuple, dict]], **config) -> Callable[[], Built]:
    def build() -> Built:
        offline()
        import transformers

        if not hasattr(transformers, model_name):
            raise Unavailable(f"transformers {transformers.__version__} has no {model_name}")
        cfg = getattr(transformers, config_name)(**config)
        _deterministic(cfg)
        model = no_randomness(getattr(transformers, model_name)(cfg)).eval()
        args, kwargs = inputs()
        return model, args, kwargs

    return build


def _pixels(size: int | tuple[int, int], channels: int = 3) -> Callable[[], tuple[tuple, dict]]:
    h, w = (size, size) if isinstance(size, int) else size
    return lambda: ((_images(2, channels, h, w),), {})


def _audio(samples: int, mask: bool = False) -> Callable[[], tuple[tuple, dict]]:
    def inputs():
        kwargs = {"attention_mask": torch.ones(2, samples, dtype=torch.long)} if mask else {}
        return (torch.randn(2, samples),), kwargs

    return inputs


def _tokens(vocab: int, length: int = 16) -> Callable[[], tuple[tuple, dict]]:
    def inputs():
        ids = torch.randint(1, vocab, (2, length))
        mask = torch.ones(2, length, dtype=torch.long)
        mask[1, -3:] = 0  # one padded sequence: the attention mask matters
        return (), {"input_ids": ids, "attention_mask": mask}

    return inputs


_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=10)
_W2V = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            conv_dim=(8, 8, 8), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2)


def _whisper_inputs():
    return (torch.randn(2, 8, 32),), {"decoder_input_ids": torch.randint(0, 64, (2, 5))}


def _speech2text_inputs():
    return (torch.randn(2, 24, 8),), {"decoder_input_ids": torch.randint(3, 64, (2, 5))}


TRANSFORMERS = [
    # vision: patch embeddings (a strided conv), conv stems and conv nets
    Entry("vit", "transformers", _hf("ViTConfig", "ViTForImageClassification", _pixels(32),
                                     image_size=32, patch_size=8, **_VIT)),
    Entry("deit", "transformers", _hf("DeiTConfig", "DeiTForImageClassificationWithTeacher", _pixels(32),
                                      image_size=32, patch_size=8, **_VIT)),
    Entry("beit", "transformers", _hf("BeitConfig", "BeitForImageClassification", _pixels(32),
                                      image_size=32, patch_size=8, use_relative_position_bias=True, **_VIT)),
    Entry("dinov2", "transformers", _hf("Dinov2Config", "Dinov2ForImageClassification", _pixels(32),
                                        image_size=32, patch_size=8, **_VIT)),
    Entry("swin", "transformers", _hf("SwinConfig", "SwinForImageClassification", _pixels(32),
                                      image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                      window_size=4, num_labels=10)),
    Entry("convnext", "transformers", _hf("ConvNextConfig", "ConvNextForImageClassification", _pixels(32),
                                          num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)),
    Entry("convnextv2", "transformers", _hf("ConvNextV2Config", "ConvNextV2ForImageClassification", _pixels(32),
                                            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)),
    Entry("resnet", "transformers", _hf("ResNetConfig", "ResNetForImageClassification", _pixels(32),
                                        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                        layer_type="bottleneck", num_labels=10)),
    Entry("regnet", "transformers", _hf("RegNetConfig", "RegNetForImageClassification", _pixels(32),
                                        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4,
                                        num_labels=10)),
    Entry("mobilenet_v1", "transformers", _hf("MobileNetV1Config", "MobileNetV1ForImageClassification",
                                              _pixels(33), depth_multiplier=0.25, image_size=33, num_labels=10)),
    Entry("mobilenet_v2", "transformers", _hf("MobileNetV2Config", "MobileNetV2ForImageClassification",
                                              _pixels(33), depth_multiplier=0.25, image_size=33, num_labels=10)),
    Entry("mobilevit", "transformers", _hf("MobileViTConfig", "MobileViTForImageClassification", _pixels(64),
                                           image_size=64, hidden_sizes=[16, 16, 16],
                                           neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32], num_attention_heads=2,
                                           num_labels=10)),
    Entry("efficientnet", "transformers", _hf("EfficientNetConfig", "EfficientNetForImageClassification",
                                              _pixels(32), image_size=32, width_coefficient=0.25,
                                              depth_coefficient=0.25, hidden_dim=320, num_labels=10)),
    Entry("levit", "transformers", _hf("LevitConfig", "LevitForImageClassificationWithTeacher", _pixels(64),
                                       image_size=64, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3],
                                       depths=[1, 1, 1], key_dim=[8, 8, 8], num_labels=10)),
    Entry("poolformer", "transformers", _hf("PoolFormerConfig", "PoolFormerForImageClassification", _pixels(32),
                                            hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=10)),
    Entry("cvt", "transformers", _hf("CvtConfig", "CvtForImageClassification", _pixels(32),
                                     embed_dim=[8, 16, 24], num_heads=[1, 2, 3], num_labels=10,
                                     depth=[1, 2, 3])),  # CvtStage indexes its drop-path rates by stage
    Entry("segformer", "transformers", _hf("SegformerConfig", "SegformerForSemanticSegmentation", _pixels(32),
                                           hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                           num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=16,
                                           num_labels=5)),
    Entry("dpt", "transformers", _hf("DPTConfig", "DPTForDepthEstimation", _pixels(32),
                                     image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4,
                                     num_attention_heads=2, intermediate_size=64, backbone_out_indices=[0, 1, 2, 3],
                                     neck_hidden_sizes=[8, 16, 24, 32], fusion_hidden_size=16)),
    Entry("yolos", "transformers", _hf("YolosConfig", "YolosForObjectDetection", _pixels(32),
                                       image_size=[32, 32], patch_size=8, num_detection_tokens=5, **_VIT)),
    # audio: conv1d feature extractors, weight-norm positional convs, conv1d front ends
    Entry("wav2vec2", "transformers", _hf("Wav2Vec2Config", "Wav2Vec2ForCTC", _audio(800),
                                          vocab_size=12, **_W2V)),
    Entry("wav2vec2_stable_layer_norm", "transformers",
          _hf("Wav2Vec2Config", "Wav2Vec2Model", _audio(800, mask=True), feat_extract_norm="layer",
              do_stable_layer_norm=True, **_W2V)),
    Entry("hubert", "transformers", _hf("HubertConfig", "HubertModel", _audio(800), **_W2V)),
    Entry("sew", "transformers", _hf("SEWConfig", "SEWModel", _audio(800), squeeze_factor=2, **_W2V)),
    Entry("unispeech", "transformers", _hf("UniSpeechConfig", "UniSpeechModel", _audio(800), **_W2V)),
    Entry("wavlm", "transformers", _hf("WavLMConfig", "WavLMModel", _audio(800), num_buckets=16,
                                       max_bucket_distance=32, **_W2V)),
    Entry("whisper", "transformers", _hf("WhisperConfig", "WhisperModel", _whisper_inputs,
                                         vocab_size=64, num_mel_bins=8, d_model=16, encoder_layers=1,
                                         decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                                         encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=16,
                                         max_target_positions=16, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2, decoder_start_token_id=1, use_cache=False)),
    Entry("speech_to_text", "transformers", _hf("Speech2TextConfig", "Speech2TextModel", _speech2text_inputs,
                                                vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                                encoder_attention_heads=2, decoder_attention_heads=2,
                                                encoder_ffn_dim=32, decoder_ffn_dim=32, conv_channels=16,
                                                input_feat_per_channel=8, max_source_positions=32,
                                                max_target_positions=16, use_cache=False)),
    # text: separable / grouped conv1d
    Entry("convbert", "transformers", _hf("ConvBertConfig", "ConvBertModel", _tokens(64), vocab_size=64,
                                          hidden_size=32, embedding_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, intermediate_size=64, conv_kernel_size=3,
                                          num_groups=2, max_position_embeddings=32)),
    Entry("squeezebert", "transformers", _hf("SqueezeBertConfig", "SqueezeBertModel", _tokens(64), vocab_size=64,
                                             hidden_size=32, embedding_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64,
                                             max_position_embeddings=32)),
    Entry("canine", "transformers", _hf("CanineConfig", "CanineModel", _tokens(1000, length=32),
                                        hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, num_hash_buckets=64, num_hash_functions=4,
                                        max_position_embeddings=64, local_transformer_stride=8,
                                        downsampling_rate=4)),
]


# -- MONAI: 3-d medical segmentation networks -------------------------------------------------------------
def _monai(factory: Callable[[Any], nn.Module], shape: tuple[int, ...]) -> Callable[[], Built]:
    def build() -> Built:
        import monai.networks.nets as nets

        return no_randomness(factory(nets)).eval(), (torch.randn(*shape),), {}

    return build


MONAI = [
    Entry("unet", "monai", _monai(lambda n: n.UNet(spatial_dims=3, in_channels=1, out_channels=2,
                                                 channels=(4, 8, 16), strides=(2, 2), num_res_units=1),
                                  (2, 1, 16, 16, 16))),
    Entry("basic_unet", "monai", _monai(lambda n: n.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2,
                                                             features=(4, 4, 8, 8, 16, 4)),
                                        (2, 1, 32, 32, 32))),
    Entry("segresnet", "monai", _monai(lambda n: n.SegResNet(spatial_dims=3, init_filters=4, in_channels=1,
                                                            out_channels=2, blocks_down=(1, 1, 1),
                                                            blocks_up=(1, 1), norm=("GROUP", {"num_groups": 2})),
                                       (2, 1, 16, 16, 16))),
    Entry("dynunet", "monai", _monai(lambda n: n.DynUNet(spatial_dims=3, in_channels=1, out_channels=2,
                                                        kernel_size=[3, 3, 3], strides=[1, 2, 2],
                                                        upsample_kernel_size=[2, 2], filters=[4, 8, 16],
                                                        res_block=True),
                                     (2, 1, 16, 16, 16))),
    Entry("unetr", "monai", _monai(lambda n: n.UNETR(in_channels=1, out_channels=2, img_size=(16, 16, 16),
                                                    feature_size=4, hidden_size=32, mlp_dim=64, num_heads=2),
                                   (2, 1, 16, 16, 16)), requires=("einops",)),
    Entry("swin_unetr", "monai", _monai(lambda n: n.SwinUNETR(in_channels=1, out_channels=2, feature_size=12,
                                                             depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
                                        (2, 1, 64, 32, 32)),  # 32x smaller at the bottom: 2 voxels for instance norm
          requires=("einops",)),
    Entry("attention_unet", "monai", _monai(lambda n: n.AttentionUnet(spatial_dims=3, in_channels=1,
                                                                     out_channels=2, channels=(4, 8, 16),
                                                                     strides=(2, 2)),
                                            (2, 1, 16, 16, 16))),
    Entry("vnet", "monai", _monai(lambda n: n.VNet(spatial_dims=3, in_channels=1, out_channels=2,
                                                  dropout_prob_down=0.0, dropout_prob_up=(0.0, 0.0)),
                                  (2, 1, 32, 32, 32))),
    Entry("densenet121_2d", "monai", _monai(lambda n: n.DenseNet(spatial_dims=2, in_channels=3, out_channels=10,
                                                                init_features=8, growth_rate=4,
                                                                block_config=(2, 2)),
                                            (2, 3, 32, 32))),
]


# -- diffusers: UNets and autoencoders ----------------------------------------------------------------------
def _diffusers(factory: Callable[[Any], nn.Module], inputs: Callable[[], tuple[tuple, dict]]) -> Callable[[], Built]:
    def build() -> Built:
        offline()
        import diffusers

        model = no_randomness(factory(diffusers)).eval()
        args, kwargs = inputs()
        return model, args, kwargs

    return build


def _unet2d_inputs():
    return (torch.randn(2, 3, 16, 16), torch.tensor([10, 500])), {}


def _unet2d_condition_inputs():
    return (torch.randn(2, 4, 16, 16), torch.tensor([10, 500])), {"encoder_hidden_states": torch.randn(2, 5, 16)}


_TINY_BLOCKS = dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1)

DIFFUSERS = [
    Entry("unet2d", "diffusers", _diffusers(
        lambda d: d.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, attention_head_dim=4,
                                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), **_TINY_BLOCKS),
        _unet2d_inputs)),
    Entry("unet2d_condition", "diffusers", _diffusers(
        lambda d: d.UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, cross_attention_dim=16,
                                         attention_head_dim=4,
                                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **_TINY_BLOCKS),
        _unet2d_condition_inputs)),
    Entry("autoencoder_kl", "diffusers", _diffusers(
        lambda d: d.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), **_TINY_BLOCKS),
        lambda: ((torch.randn(2, 3, 16, 16),), {"sample_posterior": False}))),
    Entry("vq_model", "diffusers", _diffusers(
        lambda d: d.VQModel(in_channels=3, out_channels=3, latent_channels=4, num_vq_embeddings=16,
                            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), **_TINY_BLOCKS),
        lambda: ((torch.randn(2, 3, 16, 16),), {}))),
]


# -- segmentation-models-pytorch ------------------------------------------------------------------------------
def _smp(arch: str, encoder: str, size: int = 64, **kwargs) -> Callable[[], Built]:
    def build() -> Built:
        offline()
        import segmentation_models_pytorch as smp

        model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=3, classes=2,
                                 **kwargs)
        return no_randomness(model).eval(), (_images(2, 3, size, size),), {}

    return build


SMP = [
    Entry("unet_resnet18", "smp", _smp("unet", "resnet18")),
    Entry("fpn_mobilenet_v2", "smp", _smp("fpn", "mobilenet_v2")),
    Entry("deeplabv3plus_resnet18", "smp", _smp("deeplabv3plus", "resnet18")),
    Entry("unetplusplus_efficientnet_b0", "smp", _smp("unetplusplus", "efficientnet-b0",
                                                      decoder_channels=(32, 16, 16, 8, 8))),
    Entry("linknet_timm_efficientnet_b0", "smp", _smp("linknet", "timm-efficientnet-b0")),
    Entry("pspnet_resnet18", "smp", _smp("pspnet", "resnet18")),
    Entry("manet_resnet18", "smp", _smp("manet", "resnet18", decoder_channels=(32, 16, 16, 8, 8),
                                        decoder_pab_channels=16)),
    Entry("pan_resnet18", "smp", _smp("pan", "resnet18", size=128, decoder_channels=16)),
    Entry("upernet_resnet18", "smp", _smp("upernet", "resnet18", decoder_channels=16)),
    Entry("unet_tu_tf_efficientnet_lite0", "smp", _smp("unet", "tu-tf_efficientnet_lite0",  # timm encoder
                                                       decoder_channels=(32, 16, 16, 8, 8))),
    Entry("segformer_mit_b0", "smp", _smp("segformer", "mit_b0")),
]


# -- timm ---------------------------------------------------------------------------------------------------
def _timm(name: str, size: int | tuple[int, int], batch: int = 2, **kwargs) -> Entry:
    """``timm.create_model(name)`` with random weights, 10 classes and a batch of ``size`` images."""
    h, w = (size, size) if isinstance(size, int) else size

    def build() -> Built:
        offline()
        import timm

        if not timm.is_model(name):
            raise Unavailable(f"timm {timm.__version__} has no {name}")
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
        return no_randomness(model).eval(), (_images(batch, 3, h, w),), {}

    return Entry(name, "timm", build)


TIMM = [
    # dynamic TF-style 'same' padding: Conv2dSame (and MaxPool2dSame / AvgPool2dSame) wherever timm has it
    _timm("tf_efficientnet_b0", 64),
    _timm("tf_efficientnet_lite0", 64),
    _timm("tf_efficientnet_es", 64),
    _timm("tf_efficientnet_cc_b0_4e", 64),  # CondConv2d with dynamic 'same' padding
    _timm("tf_efficientnetv2_b0", 64),
    _timm("tf_mixnet_s", 64),  # MixedConv2d of Conv2dSame
    _timm("efficientnet_b1_pruned", 64),
    _timm("efficientnet_x_b3", 64),
    _timm("tf_mobilenetv3_small_075", 64),
    _timm("tf_mobilenetv3_small_minimal_100", 64),
    _timm("tf_mobilenetv3_large_075", 64),
    _timm("maxvit_tiny_tf_224", 64, img_size=64),
    _timm("nasnetalarge", 64),
    _timm("pnasnet5large", 64),
    _timm("nest_tiny_jx", 64, img_size=64),
    _timm("mobilenetv5_300m_enc", 64, channel_multiplier=0.25),  # a feature map (an encoder)
    _timm("convmixer_1024_20_ks9_p14", 112),  # nn.Conv2d(padding="same")
    # weight-standardised convs: StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame
    _timm("resnetv2_50x1_bit", 64),
    _timm("vit_tiny_r_s16_p8_224", 64, img_size=64),
    _timm("vit_small_r26_s32_224", 64, img_size=64),
    _timm("dm_nfnet_f0", 64),
    _timm("nfnet_f0", 64),
    _timm("test_nfnet", 64),
    _timm("nf_regnet_b0", 64),
    _timm("nf_resnet26", 64),
    _timm("eca_nfnet_l0", 64),
    # conv1d (efficient channel attention), conv3d (lambda layers), transposed convs
    _timm("eca_resnext26ts", 64),
    _timm("ecaresnet26t", 64),
    _timm("lambda_resnet26t", 64),
    _timm("lowformer_b0", 64),
    _timm("efficientvim_m1", 128),
    # a broad sample of the other architectures (plain, grouped, depthwise, dilated, re-parameterisable)
    _timm("resnet18", 64),
    _timm("resnet10t", 64),
    _timm("resnet26d", 64),
    _timm("seresnext26t_32x4d", 64),
    _timm("skresnet18", 64),
    _timm("res2net50_14w_8s", 64),
    _timm("regnetx_002", 64),
    _timm("regnety_002", 64),
    _timm("regnetz_b16", 64),
    _timm("efficientnet_b0", 64),
    _timm("mixnet_s", 64),
    _timm("mobilenetv2_050", 64),
    _timm("mobilenetv3_small_050", 64),
    _timm("mobilenetv4_conv_small", 64, batch=4),
    _timm("mnasnet_small", 64),
    _timm("lcnet_050", 64),
    _timm("ghostnet_050", 64),
    _timm("hardcorenas_a", 64),
    _timm("fbnetv3_b", 64),
    _timm("tinynet_e", 64),
    _timm("rexnet_100", 64),
    _timm("densenet121", 64),
    _timm("dla34", 64),
    _timm("dpn68", 64),
    _timm("cspresnet50", 64),
    _timm("cs3darknet_focus_s", 64),
    _timm("hrnet_w18_small", 64),
    _timm("selecsls42b", 128),
    _timm("inception_v3", 160),
    _timm("xception41", 64),
    _timm("repvgg_a0", 64),
    _timm("mobileone_s0", 64),
    _timm("repghostnet_050", 64),
    _timm("ese_vovnet19b_dw", 64),
    _timm("hgnetv2_b0", 64),
    _timm("gernet_s", 64),
    _timm("botnet26t_256", 64, img_size=64),
    _timm("convnext_atto", 64),
    _timm("convnextv2_atto", 64),
    _timm("edgenext_xx_small", 64),
    _timm("fastvit_t8", 64),
    _timm("efficientformer_l1", 224),  # attention biases fixed to 7x7 tokens
    _timm("efficientformerv2_s0", 64, img_size=64),
    _timm("efficientvit_b0", 64),
    _timm("efficientvit_m0", 128, img_size=128),
    _timm("mobilevit_xxs", 64),
    _timm("mobilevitv2_050", 64),
    _timm("poolformer_s12", 64),
    _timm("coat_lite_tiny", 64, img_size=64),
    _timm("coat_tiny", 64, img_size=64),
    _timm("pvt_v2_b0", 64),
    _timm("twins_pcpvt_small", 64),
    _timm("visformer_tiny", 64, img_size=64),
    _timm("levit_128s", 128, batch=4, img_size=128),
    _timm("vit_tiny_patch16_224", 64, img_size=64),
    _timm("deit_tiny_distilled_patch16_224", 64, img_size=64),
    _timm("swin_tiny_patch4_window7_224", 56, img_size=56),
    _timm("convit_tiny", 64, img_size=64),
    _timm("pit_ti_224", 64, img_size=64),
    _timm("xcit_nano_12_p16_224", 64, img_size=64),
    _timm("coatnet_nano_rw_224", 64, img_size=64),
    _timm("tiny_vit_5m_224", 64),
    _timm("gcvit_xxtiny", 64, img_size=64),
    _timm("davit_tiny", 64),
    _timm("focalnet_tiny_srf", 64),
    _timm("mambaout_femto", 64),
    _timm("starnet_s050", 64),
    _timm("inception_next_tiny", 64),
    _timm("hiera_tiny_224", 64, img_size=64),
]


# -- ultralytics: YOLO detection and segmentation -----------------------------------------------------------
def _yolo(task: str, cfg: str, size: int = 64) -> Callable[[], Built]:
    """``ultralytics.nn.tasks.<task>(cfg)`` from a yaml ultralytics ships (the scale letter in ``cfg`` picks
    the width and depth), 4 classes, random weights, on a batch of ``size`` images. The constructor runs
    one forward with the head in training mode (to find the strides); the head caches its anchors and the
    input shape they are for (``Detect.anchors``, ``Detect.shape``) on the first eval-mode call only."""

    def build() -> Built:
        offline()
        import ultralytics
        from ultralytics.nn import tasks

        if not hasattr(tasks, task):
            raise Unavailable(f"ultralytics {ultralytics.__version__} has no {task}")
        try:
            model = getattr(tasks, task)(cfg, ch=3, nc=4, verbose=False)
        except FileNotFoundError as exc:
            raise Unavailable(f"ultralytics {ultralytics.__version__} has no {cfg}: {exc}") from exc
        return no_randomness(model).eval(), (_images(2, 3, size, size),), {}

    return build


ULTRALYTICS = [
    Entry("yolov8n", "ultralytics", _yolo("DetectionModel", "yolov8n.yaml")),
    Entry("yolov8n_seg", "ultralytics", _yolo("SegmentationModel", "yolov8n-seg.yaml")),
    Entry("yolo11n", "ultralytics", _yolo("DetectionModel", "yolo11n.yaml", size=96)),  # 2x2 maps: 3e-5 at 64
    Entry("yolo11n_seg", "ultralytics", _yolo("SegmentationModel", "yolo11n-seg.yaml")),
    Entry("yolo26n", "ultralytics", _yolo("DetectionModel", "yolo26n.yaml", size=96)),  # NMS-free one-to-one head
]


# -- torchaudio: wav2vec2, WavLM, Conformer ------------------------------------------------------------------
_TA_W2V = dict(extractor_conv_layer_config=[(8, 10, 5), (8, 3, 2), (8, 3, 2)], encoder_embed_dim=16,
               encoder_projection_dropout=0.0, encoder_pos_conv_kernel=16, encoder_pos_conv_groups=2,
               encoder_num_layers=2, encoder_num_heads=2, encoder_attention_dropout=0.0,
               encoder_ff_interm_features=32, encoder_ff_interm_dropout=0.0, encoder_dropout=0.0,
               encoder_layer_drop=0.0)


def _torchaudio(builder: str, inputs: Callable[[], tuple[tuple, dict]], **config) -> Callable[[], Built]:
    def build() -> Built:
        import torchaudio
        import torchaudio.models as models

        if not hasattr(models, builder):
            raise Unavailable(f"torchaudio {torchaudio.__version__} has no {builder}")
        model = no_randomness(getattr(models, builder)(**config)).eval()
        args, kwargs = inputs()
        return model, args, kwargs

    return build


def _waveforms(samples: int, lengths: bool) -> Callable[[], tuple[tuple, dict]]:
    """Two waveforms; with ``lengths`` (in samples) the second is padded: the padding mask matters."""
    def inputs():
        kwargs = {"lengths": torch.tensor([samples, samples - 200])} if lengths else {}
        return (torch.randn(2, samples),), kwargs

    return inputs


def _conformer_inputs():
    return (torch.randn(2, 20, 16), torch.tensor([20, 15])), {}


TORCHAUDIO = [
    # the group-norm extractor and post-norm encoder of wav2vec2_base and hubert_base
    Entry("wav2vec2_base", "torchaudio", _torchaudio("wav2vec2_model", _waveforms(800, lengths=True),
                                                     extractor_mode="group_norm", extractor_conv_bias=False,
                                                     encoder_layer_norm_first=False, aux_num_out=None, **_TA_W2V)),
    # the layer-norm extractor and pre-norm encoder of wav2vec2_large_lv60k, hubert_large and XLS-R, a CTC head
    Entry("wav2vec2_large_lv60k", "torchaudio", _torchaudio("wav2vec2_model", _waveforms(800, lengths=False),
                                                            extractor_mode="layer_norm", extractor_conv_bias=True,
                                                            encoder_layer_norm_first=True, aux_num_out=12,
                                                            **_TA_W2V)),
    # without lengths: torchaudio's WavLM self-attention asserts that it gets no attention mask
    Entry("wavlm", "torchaudio", _torchaudio("wavlm_model", _waveforms(800, lengths=False),
                                             extractor_mode="group_norm", extractor_conv_bias=False,
                                             encoder_num_buckets=16, encoder_max_distance=32,
                                             encoder_layer_norm_first=False, aux_num_out=None, **_TA_W2V)),
    # depthwise and pointwise conv1d in every block; lengths are required (the padding mask)
    Entry("conformer", "torchaudio", _torchaudio("Conformer", _conformer_inputs, input_dim=16, num_heads=2,
                                                 ffn_dim=32, num_layers=2, depthwise_conv_kernel_size=7)),
]


# -- speechbrain: speaker embedders --------------------------------------------------------------------------
def _speechbrain(module: str, cls: str, lengths: str, **config) -> Callable[[], Built]:
    """``speechbrain.lobes.models.<module>.<cls>(**config)`` on two sequences of 50 frames of 24 features,
    the second padded, its relative length (speechbrain's are a fraction of the longest) passed as the
    forward's keyword ``lengths``."""

    def build() -> Built:
        import importlib

        import speechbrain

        try:
            factory = getattr(importlib.import_module(f"speechbrain.lobes.models.{module}"), cls)
        except (ImportError, AttributeError) as exc:
            raise Unavailable(f"speechbrain {speechbrain.__version__} has no {module}.{cls}") from exc
        model = no_randomness(factory(**config))
        for m in model.modules():
            if type(m).__name__ == "StatisticsPooling":
                m.eps = 0.0  # it adds noise of this scale to the mean, in eval mode too
        return model.eval(), (torch.randn(2, 50, 24),), {lengths: torch.tensor([1.0, 0.8])}

    return build


SPEECHBRAIN = [
    Entry("xvector", "speechbrain", _speechbrain("Xvector", "Xvector", "lens", in_channels=24, tdnn_blocks=3,
                                                 tdnn_channels=[16, 16, 32], tdnn_kernel_sizes=[5, 3, 1],
                                                 tdnn_dilations=[1, 2, 1], lin_neurons=16)),
    Entry("ecapa_tdnn", "speechbrain", _speechbrain("ECAPA_TDNN", "ECAPA_TDNN", "lengths", input_size=24,
                                                    channels=[16, 16, 16, 16, 48], kernel_sizes=[5, 3, 3, 3, 1],
                                                    dilations=[1, 2, 3, 4, 1], attention_channels=8,
                                                    res2net_scale=4, se_channels=8, lin_neurons=16)),
]


# -- the whole catalogue ------------------------------------------------------------------------------------
# -- a second shape to call every model on -------------------------------------------------------------------
#: Per family, which dimensions of the first input grow for the second call (the batch always does, in every
#: tensor that shares it): "spatial" (images, volumes: every dimension after the channels, by half, to a
#: multiple of 32 from 32 up, as strided backbones need), "length" (dimension 1 of waveforms, token ids,
#: speechbrain and Conformer features: by half, with every input of that length).
SECOND_SHAPE = {"transformers": "auto", "timm": "spatial", "monai": "spatial", "diffusers": "spatial",
                "smp": "spatial", "ultralytics": "spatial", "torchaudio": "length", "speechbrain": "length"}

_GUARDED = ("size: the model computes sizes in Python from the input's, and torch.export keeps the example's "
            "relation as the guard ")  # not investigated further, model by model

#: Entries whose result is refused on the second shape by a guard torch.export had to record, and why.
FIXED_SHAPE = {
    "speechbrain/ecapa_tdnn": "batch: speechbrain's length_to_mask takes len(lengths), a Python int",
    "timm/tf_efficientnet_lite0": "image size: run-time 'same' padding makes a free size take torch.export "
                                  "minutes; past ipfx.capture.export.DYNAMIC_EXPORT_SECONDS only the batch is free",
    "smp/unet_tu_tf_efficientnet_lite0": "image size: the same 'same'-padding encoder (timm tf_efficientnet_lite0)",
    "transformers/beit": _GUARDED + "`-1 + 2 * (pixel_values.shape[2] // 8) == 7`",
    "transformers/dinov2": _GUARDED + "`pixel_values.shape[2] // 8 * (pixel_values.shape[3] // 8) == 16`",
    "transformers/swin": _GUARDED + "`pixel_values.shape[2] == 32`",
    "transformers/mobilenet_v1": _GUARDED + "`pixel_values.shape[2] == 33`",
    "transformers/mobilenet_v2": _GUARDED + "`33 == pixel_values.shape[2]`",
    "transformers/mobilevit": _GUARDED + "`2 * math.ceil((1 + (-1 + pixel_values.shape[2]) // 8) / 2) == 8`",
    "transformers/efficientnet": _GUARDED + "`pixel_values.shape[3] // 32 == 1`",
    "transformers/poolformer": _GUARDED + "`1 + (-3 + pixel_values.shape[3]) // 32 == 1`",
    "transformers/cvt": _GUARDED + "`pixel_values.shape[3] <= 34`",
    "transformers/segformer": _GUARDED + "`pixel_values.shape[2] <= 32`",
    "transformers/canine": _GUARDED + "`32 == input_ids.shape[1]`",
    "transformers/dpt": _GUARDED + "`math.trunc(torch.sym_float(pixel_values.shape[2] // 8 * "
                                   "(pixel_values.shape[3] // 8)) ** 0.5) == 4`",
    "timm/tf_efficientnet_b0": _GUARDED + "`x.shape[2] == 64`",
    "timm/tf_efficientnet_es": _GUARDED + "`x.shape[2] == 64`",
    "timm/tf_efficientnet_cc_b0_4e": _GUARDED + "`x.shape[2] == 64`",
    "timm/tf_efficientnetv2_b0": _GUARDED + "`x.shape[2] == 64`",
    "timm/tf_mixnet_s": _GUARDED + "`x.shape[2] == 64`",
    "timm/efficientnet_b1_pruned": _GUARDED + "`x.shape[2] == 64`",
    "timm/efficientnet_x_b3": _GUARDED + "`x.shape[2] == 64`",
    "timm/tf_mobilenetv3_small_075": _GUARDED + "`x.shape[2] == 64`",
    "timm/tf_mobilenetv3_small_minimal_100": _GUARDED + "`x.shape[2] == 64`",
    "timm/tf_mobilenetv3_large_075": _GUARDED + "`x.shape[2] == 64`",
    "timm/nasnetalarge": _GUARDED + "`x.shape[2] == 64`",
    "timm/pnasnet5large": _GUARDED + "`x.shape[2] == 64`",
    "timm/mobilenetv5_300m_enc": _GUARDED + "`x.shape[2] == 64`",
    "timm/dm_nfnet_f0": _GUARDED + "`x.shape[2] == 64`",
    "timm/mobilevit_xxs": _GUARDED + "`x.shape[2] == 64`",
    "timm/mobilevitv2_050": _GUARDED + "`x.shape[2] == 64`",
    "timm/tiny_vit_5m_224": _GUARDED + "`x.shape[2] == 64`",
    "timm/davit_tiny": _GUARDED + "`x.shape[2] == 64`",
    "timm/efficientvit_m0": _GUARDED + "`x.shape[2] == 128`",
    "monai/swin_unetr": "image size: each stage pads to whole windows with int(np.ceil(size / window)) and builds its "
                        "shifted-window mask from those Python ints (monai's compute_mask), which torch.export "
                        "specialises",
}

#: Never-called tests that still fail, by entry and mode ("example-inputs" or "no-example"), and why (open
#: work; each is an expected failure of that test).
KNOWN_FAILS: dict[tuple[str, str], str] = {}

#: The entries whose never-called, second-shape test runs by default (one or two per family, the cheap ones).
NEVER_CALLED_FAST = ["transformers/vit", "transformers/wav2vec2", "timm/test_nfnet", "monai/basic_unet",
                     "smp/unet_resnet18", "timm/tf_mobilenetv3_small_minimal_100",
                     "torchaudio/conformer", "torchaudio/wavlm", "speechbrain/ecapa_tdnn"]
#: Of those, the ones whose default run takes the mode without example inputs only (the example-inputs mode
#: took 12-14 s each on two cores; both modes run with -m slow). timm's mobilenetv3: its ``BatchNormAct2d``
#: (a batch norm subclass with an activation, kept whole by the symbolic trace) once lost its activation
#: to the frozen lowering's batch norm folding (1 s).
NEVER_CALLED_FAST_NO_EXAMPLE = ["monai/basic_unet", "smp/unet_resnet18", "timm/tf_mobilenetv3_small_minimal_100"]


def second_inputs(entry: Entry, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The entry's inputs with one more sample and, by :data:`SECOND_SHAPE`, larger images or sequences,
    built by tiling the example (token ids, masks and lengths stay valid)."""
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    tensors = [v for v in leaves if isinstance(v, torch.Tensor) and v.dim() > 0]
    first = tensors[0]
    batch = first.shape[0]
    rule = SECOND_SHAPE[entry.family]
    if rule == "auto":  # transformers: pixel values are images, everything else is a sequence
        rule = "spatial" if first.is_floating_point() and first.dim() == 4 else "length"
    grow: dict[int, int] = {}  # old size -> new size, for the grown dimensions of the first input
    if rule == "spatial" and first.is_floating_point() and first.dim() >= 4:
        for n in first.shape[2:]:
            grow[n] = -(-(n + n // 2) // 32) * 32 if n >= 32 else n + max(n // 2, 1)
    elif rule == "length" and first.dim() >= 2:
        grow[first.shape[1]] = first.shape[1] + first.shape[1] // 2
    out = []
    for v in leaves:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            if v.shape[0] == batch:
                v = v[torch.arange(batch + 1) % batch]
            dims = range(2, v.dim()) if rule == "spatial" else range(1, min(v.dim(), 2))
            if v is not None and (v.dim() == first.dim() or rule == "length"):
                for d in dims:
                    if v.shape[d] in grow:
                        v = v.index_select(d, torch.arange(grow[v.shape[d]]) % v.shape[d])
        out.append(v)
    new_args, new_kwargs = pytree.tree_unflatten(out, spec)
    return tuple(new_args), dict(new_kwargs)


ALL: list[Entry] = TRANSFORMERS + TIMM + MONAI + DIFFUSERS + SMP + ULTRALYTICS + TORCHAUDIO + SPEECHBRAIN
BY_ID: dict[str, Entry] = {e.id: e for e in ALL}
FAMILIES: list[str] = list(LIBRARY)

#: Run by default (the rest is marked slow): a spread over the families and over what breaks capture.
FAST: list[str] = [
    "transformers/vit",  # untraced code reads the patch embedding's weight.dtype
    "transformers/wav2vec2",  # conv1d feature extractor, weight-norm positional conv
    "transformers/convbert",  # separable conv1d in a text model, optional-argument branches
    "timm/test_nfnet",  # ScaledStdConv2d: weight standardisation in forward
    "monai/basic_unet",  # isinstance checks on optional skip inputs in the decoder
    "diffusers/unet2d_condition",  # cross attention, timestep embedding, transposed/strided convs
    "smp/unet_resnet18",  # outer code reads encoder.output_stride
    "ultralytics/yolov8n",  # a detection head that caches its anchors per input shape (about 20 s)
    "torchaudio/conformer",  # lengths -> padding mask through .item(): export fails, symbolic capture
    "speechbrain/ecapa_tdnn",  # relative lengths -> attention mask, Res2Net split convs, SE blocks
]
