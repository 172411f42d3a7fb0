# tunectl's portable llama.cpp build, included by llama-cpp-python's top-level CMakeLists through
# CMAKE_PROJECT_llama_cpp_INCLUDE (jobs/tunectl_jobs/llamabuild.py passes it, with
# CMAKE_INSTALL_BINDIR=llama_cpp/lib so that ggml installs its CPU variants beside libggml).
#
# With GGML_BACKEND_DL and GGML_CPU_ALL_VARIANTS, ggml builds its CPU backend once per x86-64 level as a
# loadable module (libggml-cpu-<variant>.so) and picks, at run time, the best one the CPU supports;
# tunectl_jobs.llamarun loads them from llama-cpp-python's lib directory.
#
# Not shipped (TUNECTL_SKIP_CPU_VARIANTS):
# - sapphirerapids, the only variant with AMX. Its AMX code crashes on q4_k_m and q8_0 at the pinned version:
#   SIGSEGV in ggml_backend_amx_mul_mat on an AMX Xeon VM (llama.cpp issue 20824, open without a fix), SIGILL on
#   the GPU test host's AMX Xeon under gVisor (docs/llama-cpp-builds.md). An AMX CPU then runs the zen4 variant:
#   the same AVX-512 VBMI / VNNI / BF16 code, without AMX.
# - ivybridge, piledriver, cannonlake, cooperlake: CPUs that are rare in clusters, each served by the next
#   variant down (sandybridge, sandybridge, skylakex, cascadelake) at the cost of one feature; each would add
#   about a minute of build time on two cores.
# ggml makes libggml depend on every variant it defines, so one cannot be left out of the build; an unshipped
# variant is compiled from an empty file instead (no time, no code) and renamed so that ggml never loads it.
set(TUNECTL_SKIP_CPU_VARIANTS "sapphirerapids;ivybridge;piledriver;cannonlake;cooperlake"
    CACHE STRING "ggml CPU variants tunectl does not ship")

function(_tunectl_cpu_variants)
  get_property(targets DIRECTORY "${CMAKE_SOURCE_DIR}/vendor/llama.cpp/ggml/src" PROPERTY BUILDSYSTEM_TARGETS)
  set(stub "${CMAKE_BINARY_DIR}/tunectl-unshipped-cpu-variant.c")
  file(WRITE "${stub}" "/* a ggml CPU variant tunectl does not ship (llamacpp_cpu_variants.cmake) */\n")
  set(shipped "")
  foreach(target IN LISTS targets)
    get_target_property(type ${target} TYPE)
    if(NOT type STREQUAL "MODULE_LIBRARY" OR NOT target MATCHES "^ggml-cpu-(.+)$")
      continue()  # not a loadable variant (ggml-cpu-<variant>-feats are its feature probes)
    endif()
    set(variant "${CMAKE_MATCH_1}")
    if(variant IN_LIST TUNECTL_SKIP_CPU_VARIANTS)
      set_property(TARGET ${target} PROPERTY SOURCES "${stub}")
      set_property(TARGET ${target} PROPERTY OUTPUT_NAME "tunectl-unshipped-${variant}")
    else()
      list(APPEND shipped "${variant}")
    endif()
  endforeach()
  if(NOT shipped)
    message(FATAL_ERROR "tunectl: no ggml CPU variant to ship (GGML_BACKEND_DL and GGML_CPU_ALL_VARIANTS on?)")
  endif()
  message(STATUS "tunectl: shipping CPU variants ${shipped}")
endfunction()

cmake_language(DEFER CALL _tunectl_cpu_variants)
