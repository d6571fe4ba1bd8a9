// What differs between the MLX releases the extension builds against (pyproject.toml's mlx range).
#pragma once

#include "mlx/array.h"

namespace mlx_compat {

// Whether MLX's allocator owns a buffer, so that it may be donated. MLX 0.32 added
// allocator::Data::is_owned() (false for memory wrapped from outside); before it, MLX's own
// donation test asked for no such thing, and neither does this.
template <typename D>
auto allocator_owns(const D& data, int) -> decltype(data.is_owned()) {
  return data.is_owned();
}
template <typename D>
bool allocator_owns(const D&, long) {
  return true;
}
inline bool allocator_owns(const mlx::core::array::Data& data) {
  return allocator_owns(data, 0);
}

}  // namespace mlx_compat
