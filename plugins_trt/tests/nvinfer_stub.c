/* Stand-in for libnvinfer / libnvinfer_plugin / libnvonnxparser, for machines without TensorRT.
 *
 * It defines only the C entry points that the TensorRT Python bindings (tensorrt.so) and the
 * statically registering plugin library (getPluginRegistry, getLogger) link against. Every factory returns NULL, so the
 * real bindings import and their classes, enums and docstrings can be inspected, but nothing
 * can be built or run: the API check and the link check use it, never a behaviour test.
 * Compiled by the tests into their temporary folder, once per soname (libnvinfer.so.10, ...).
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

void* createInferBuilder_INTERNAL(void* logger, int32_t version) { return NULL; }
void* createInferRefitter_INTERNAL(void* engine, void* logger, int32_t version) { return NULL; }
void* createInferRuntime_INTERNAL(void* logger, int32_t version) { return NULL; }
void* createNvOnnxParser_INTERNAL(void* network, void* logger, int32_t version) { return NULL; }
void* createNvOnnxParserRefitter_INTERNAL(void* refitter, void* logger, int32_t version) { return NULL; }
void* getBuilderPluginRegistry(int32_t capability) { return NULL; }
void* getPluginRegistry(void) { return NULL; }
void* getLogger(void) { return NULL; }
int32_t getNvOnnxParserVersion(void) { return 0; }
bool initLibNvInferPlugins(void* logger, char const* plugin_namespace) { return false; }
