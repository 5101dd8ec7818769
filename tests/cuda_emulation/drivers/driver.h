// Shared pieces of the emulator's drivers: the C entry points that tests/cuda_emulation/emulator.py
// calls through ctypes to run the project's CUDA launchers on CPU buffers.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "fdemu/cuda.h"

namespace fdemu {

// Element types of the buffers a driver is given, as emulator.py numbers them.
enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Calls f(float{}), f(__half{}) or f(__nv_bfloat16{}) for `code`.
template <class F>
void dispatch_dtype(int code, const char* what, F&& f) {
  switch (code) {
    case kFloat32:
      return f(float{});
    case kFloat16:
      return f(__half{});
    case kBFloat16:
      return f(__nv_bfloat16{});
  }
  driver_error((std::string(what) + ": unknown dtype code " + std::to_string(code)).c_str());
}

// A device workspace as the torch bindings allocate it (at::empty: contents undefined): fenced, and
// filled with the poison byte so that reading what no kernel wrote shows up in the results.
struct PoisonedWorkspace {
  void* data;
  explicit PoisonedWorkspace(size_t bytes) : data(fenced_alloc(bytes, false, "workspace")) {
    if (data == nullptr) driver_error("cannot allocate the workspace");
    std::memset(data, poison_byte(), bytes);
  }
  ~PoisonedWorkspace() { fenced_free(data); }
  PoisonedWorkspace(const PoisonedWorkspace&) = delete;
  PoisonedWorkspace& operator=(const PoisonedWorkspace&) = delete;
};

// A launcher's CUDA error ends the driver call with its name.
inline void check_launch(cudaError_t error, const char* launcher) {
  if (error != cudaSuccess) {
    driver_error((std::string(launcher) + " returned CUDA error " + std::to_string(static_cast<int>(error)) + " (" +
                  cudaGetErrorString(error) + ")")
                     .c_str());
  }
}

// Runs `body` (a lambda) through guarded_call.
template <class Body>
int run_guarded(Body& body) {
  return guarded_call([](void* raw) { (*static_cast<Body*>(raw))(); }, &body);
}

}  // namespace fdemu
