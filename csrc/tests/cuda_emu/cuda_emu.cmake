# Every CUDA kernel file on the CPU under the emulator (README.md beside this file), included by
# the top CMakeLists.txt when DCX_CUDA_EMU=ON. Per csrc/cuda/<name>_kernel.cu:
#   gen/<name>_kernel.cpp      the .cu rewritten by cu2cpp.py (launches, __shared__)
#   emu_<name>_kernel          that file compiled as C++20 with cuda_emu.h force-included
#   test_<name>_kernel         its harness (test_<name>_kernel.cpp here: required) + the runtime
#   cuda_emu.<name>.<schedule> one ctest per thread schedule (label cuda_emu)
set(dcx_emu_dir ${CMAKE_SOURCE_DIR}/csrc/tests/cuda_emu)
set(dcx_emu_gen ${CMAKE_BINARY_DIR}/cuda_emu_gen)
file(MAKE_DIRECTORY ${dcx_emu_gen})

find_package(Python3 REQUIRED COMPONENTS Interpreter)
find_path(DCX_CUDA_INCLUDE cuda_runtime_api.h
          HINTS $ENV{CUDA_HOME}/include $ENV{CUDA_PATH}/include /usr/local/cuda/include
          DOC "The CUDA headers (cuda_runtime_api.h, cuda_fp16.h, cuda_bf16.h)")
if(NOT DCX_CUDA_INCLUDE)
  message(FATAL_ERROR "DCX_CUDA_EMU needs the CUDA headers (no GPU, no CUDA library): set "
                      "DCX_CUDA_INCLUDE=<toolkit>/include or CUDA_HOME")
endif()

# The flags every emulated object shares: C++20 (std::source_location, std::atomic_ref), -O1 in
# every build type (the fibers make -O0 slow, and ASan builds are Debug), and the rounding mode.
if(DCX_CUDA_EMU_FMA)
  # nvcc's default: a * b + c is one FMA (GCC contracts in a pass that -O1 leaves out).
  set(dcx_emu_fp -mfma -ffp-contract=fast -fexpensive-optimizations)
else()
  set(dcx_emu_fp -ffp-contract=off)         # every product rounded on its own
endif()

add_library(dcx_cuda_emu STATIC ${dcx_emu_dir}/cuda_emu.cpp)
set_target_properties(dcx_cuda_emu PROPERTIES CXX_STANDARD 20)
target_include_directories(dcx_cuda_emu PUBLIC ${DCX_CUDA_INCLUDE})
target_compile_options(dcx_cuda_emu PRIVATE -O1)
target_link_libraries(dcx_cuda_emu PUBLIC pthread)
if(dcx_sanitize STREQUAL "thread")
  # The runtime's bookkeeping is shared by all fibers of one OS thread without locks: it tells
  # ThreadSanitizer about fibers and CUDA's synchronisation instead of being checked itself.
  target_compile_options(dcx_cuda_emu PRIVATE -fno-sanitize=thread)
  target_compile_definitions(dcx_cuda_emu PRIVATE EMU_TSAN_FIBERS)
endif()
if(DCX_CUDA_EMU_FMA)
  target_compile_definitions(dcx_cuda_emu PRIVATE EMU_FMA_KERNELS)
endif()

file(GLOB dcx_emu_kernels CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/csrc/cuda/*_kernel.cu)
foreach(kernel_source ${dcx_emu_kernels})
  get_filename_component(kernel_file ${kernel_source} NAME_WE)  # <name>_kernel
  string(REGEX REPLACE "_kernel$" "" name ${kernel_file})
  set(harness ${dcx_emu_dir}/test_${kernel_file}.cpp)
  if(NOT EXISTS ${harness})
    message(FATAL_ERROR "csrc/cuda/${kernel_file}.cu has no emulator harness: a CUDA kernel file "
                        "gets csrc/tests/cuda_emu/test_${kernel_file}.cpp in the same change")
  endif()

  set(generated ${dcx_emu_gen}/${kernel_file}.cpp)
  add_custom_command(
    OUTPUT ${generated}
    COMMAND Python3::Interpreter ${dcx_emu_dir}/cu2cpp.py ${kernel_source} ${generated}
    DEPENDS ${kernel_source} ${dcx_emu_dir}/cu2cpp.py
    COMMENT "cu2cpp.py ${kernel_file}.cu")
  add_library(emu_${kernel_file} OBJECT ${generated})
  add_executable(test_${kernel_file} ${harness} $<TARGET_OBJECTS:emu_${kernel_file}>)
  foreach(target emu_${kernel_file} test_${kernel_file})
    set_target_properties(${target} PROPERTIES CXX_STANDARD 20)
    target_include_directories(${target} PRIVATE ${CMAKE_SOURCE_DIR}/csrc ${dcx_emu_dir}/include
                               ${DCX_CUDA_INCLUDE})
    target_compile_options(${target} PRIVATE -O1 -Wno-unknown-pragmas)
  endforeach()
  # The kernel rounds as DCX_CUDA_EMU_FMA says; the harness's references as the CPU build does
  # (setup.py compiles no contraction into them). The kernel sees the emulator through the
  # force-included header.
  target_compile_options(emu_${kernel_file} PRIVATE ${dcx_emu_fp} -include ${dcx_emu_dir}/cuda_emu.h)
  target_compile_options(test_${kernel_file} PRIVATE -ffp-contract=off)
  if(dcx_sanitize STREQUAL "thread")
    target_compile_definitions(test_${kernel_file} PRIVATE EMU_TSAN)  # a harness may need to know
  endif()
  set_source_files_properties(${generated} PROPERTIES OBJECT_DEPENDS ${dcx_emu_dir}/cuda_emu.h)
  target_link_libraries(test_${kernel_file} PRIVATE dcx_core dcx_cuda_emu)

  foreach(schedule ${DCX_CUDA_EMU_SCHEDULES})
    add_test(NAME cuda_emu.${name}.${schedule} COMMAND test_${kernel_file})
    set_tests_properties(cuda_emu.${name}.${schedule} PROPERTIES
      LABELS cuda_emu
      ENVIRONMENT "EMU_SCHEDULE=${schedule};TSAN_OPTIONS=halt_on_error=1")
  endforeach()
endforeach()
