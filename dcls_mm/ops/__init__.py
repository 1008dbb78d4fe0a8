"""DCLS operators: kernel construction and convolution modules (no OpenMMLab imports)."""
from .conversion import (convert_dense_state_dict, convert_to_dcls, exact_dcls_parameters,
                         iso_count)
from .convert import convert_reference_positions, convert_reference_state_dict
from .depthwise import depthwise_conv2d
from .introspect import dcls_layers, dcls_position_parameters, is_dcls_layer, layer_interpolation
from .kernel import INTERPOLATIONS, canonical_interpolation, construct_kernel
from .modules import (DCLS_LAYER_TYPES, Dcls1d, Dcls2_1d, Dcls2d, Dcls2dK1d, Dcls3_1d, Dcls3d,
                      set_impl)

__all__ = [
    'Dcls1d', 'Dcls2d', 'Dcls3d', 'Dcls2_1d', 'Dcls3_1d', 'Dcls2dK1d', 'DCLS_LAYER_TYPES',
    'construct_kernel',
    'canonical_interpolation', 'INTERPOLATIONS', 'convert_reference_positions',
    'convert_reference_state_dict', 'depthwise_conv2d', 'set_impl',
    'dcls_layers', 'dcls_position_parameters', 'is_dcls_layer', 'layer_interpolation',
    'convert_to_dcls',
    'convert_dense_state_dict', 'exact_dcls_parameters', 'iso_count'
]
